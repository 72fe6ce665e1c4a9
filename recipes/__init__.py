"""Built-in recipes (TOML), shipped as package data so they load from an installed wheel."""
