"""The run of record behind the READMEs' figures: it is a run of this foldnorm version, and the READMEs'
parts and the plots are what `python -m benchmarks figures` makes of it."""
import json
from pathlib import Path

import pytest

import foldnorm
from benchmarks import figures, report
from benchmarks.__main__ import main

ROOT = Path(__file__).resolve().parent.parent.parent


def test_the_run_of_record_is_of_this_foldnorm_version_and_names_its_machine():
    machine = figures.load()["machine"]
    assert machine["versions"]["foldnorm"] == foldnorm.__version__, (
        "the run of record (benchmarks/record/results.json) is of foldnorm %s, the package is %s: run "
        "`make figures` to measure this version" % (machine["versions"]["foldnorm"], foldnorm.__version__))
    assert machine["cpu_model"] and machine["usable_cores"] >= 1 and machine["date"]


@pytest.mark.parametrize("path", ["README.md", "benchmarks/README.md"])
def test_each_readme_part_is_made_from_the_run_of_record(path):
    record = figures.load()
    text = (ROOT / path).read_text()
    part = figures.generated_parts(record)[path]
    assert figures.replace_part(text, part, path) == text, (
        "%s's run-of-record part is not what `python -m benchmarks figures` makes of the record" % path)
    assert "foldnorm %s" % record["machine"]["versions"]["foldnorm"] in part
    assert ("BUSY MACHINE" in part) == record["machine_check"]["busy"]


def test_each_plot_is_drawn_from_the_run_of_record():
    image = pytest.importorskip("PIL.Image")
    record = figures.load()
    names = report.plot_names(record)
    assert names == ["kernels_gbps.png", "thread_scaling.png", "model_latency.png"]
    for name in names:
        with image.open(Path(figures.FIGURES) / name) as png:
            assert png.text.get("Source") == report.plot_source(record), name


def test_a_readme_without_its_markers_is_refused():
    with pytest.raises(ValueError, match="README.md has no"):
        figures.replace_part("# no markers here\n", "part", "README.md")


def test_a_file_that_is_not_a_run_is_not_adopted(tmp_path, capsys):
    before = Path(figures.RECORD).read_bytes()
    not_a_run = tmp_path / "results.json"
    not_a_run.write_text(json.dumps({"machine": {"date": "today"}}))
    assert main(["figures", str(not_a_run)]) == 2
    assert "lacks cpu_model, versions" in capsys.readouterr().err
    assert Path(figures.RECORD).read_bytes() == before
