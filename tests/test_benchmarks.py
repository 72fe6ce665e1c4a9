"""Benchmark tooling: the peer benchmark regenerates only its own section of BENCHMARKS.md; a
`benchmarks.draws` row parses its overrides as `ptq quantize --set` does."""
import pytest

from benchmarks.draws import parse_row
from benchmarks.run import BEGIN, END, write_section
from ptq.errors import RecipeError


def test_write_section_keeps_the_hand_written_text(tmp_path):
    p = tmp_path / "B.md"
    p.write_text(f"# B\n\nintro\n\n{BEGIN}\nold table\n{END}\n\n## later\ntext\n")
    write_section(p, "new table\n")
    assert p.read_text() == f"# B\n\nintro\n\n{BEGIN}\nnew table\n{END}\n\n## later\ntext\n"
    write_section(p, "newer\n")
    assert p.read_text().count(BEGIN) == 1 and "new table" not in p.read_text() and "newer" in p.read_text()
    assert not list(tmp_path.glob("*.tmp"))


def test_write_section_into_a_new_file(tmp_path):
    p = tmp_path / "new.md"
    write_section(p, "table\n")
    assert p.read_text() == f"{BEGIN}\ntable\n{END}\n"


def test_a_draws_row_is_a_recipe_and_its_overrides_parsed_as_ptq_set_parses_them():
    assert parse_row("w4a8-learned rounding.bias_rate=0.01 rounding.start=feedback bias_correction.samples=32") == \
        ("w4a8-learned", {"rounding.bias_rate": 0.01, "rounding.start": "feedback", "bias_correction.samples": 32})
    assert parse_row("bitplane") == ("bitplane", {})
    with pytest.raises(RecipeError, match="--set expects key=value"):
        parse_row("bitplane rounding.damp")


def test_a_draws_row_is_calibrated_as_its_recipe_says():
    """`bitplane` collects its coherent sensitivity on 128 samples; a recipe with w8a8's statistics
    needs none of its own; --set wins over the recipe."""
    from benchmarks.variants import statistics_keys
    assert statistics_keys("bitplane", {}, {}) == {"calibration.sensitivity": "coherent", "calibration.sensitivity_samples": 128}
    assert statistics_keys("bitplane-4.5", {}, {}) == {}
    assert statistics_keys("w8a8-fast", {}, {}) == {}  # verify_size and layer_moments size later stages only
    assert statistics_keys("bitplane", {"calibration.sensitivity": "diagonal"}, {"calibration.sensitivity_samples": 64}) == \
        {"calibration.sensitivity_samples": 64}
