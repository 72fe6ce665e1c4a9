"""The peer benchmark regenerates only its own section of BENCHMARKS.md."""
from benchmarks.run import BEGIN, END, write_section


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
