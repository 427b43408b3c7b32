"""scripts.param_table: its JSON against the formulas of HETXL.md section 2."""

import json
import subprocess
import sys

import pytest

from scripts import param_table
from tests import REPO


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("temperature", ["learned", "fixed"])
def test_json_rows_follow_the_formulas(capsys, full, temperature):
    dim, factors, classes = 24, 5, [3, 40, 1000]
    argv = ["--dim", str(dim), "--classes", *map(str, classes), "--factors", str(factors)]
    argv += ["--json", "--temperature", temperature] + (["--full"] if full else [])
    param_table.main(argv)
    rows = json.loads(capsys.readouterr().out)
    tau = 1 if temperature == "learned" else 0
    assert [row["classes"] for row in rows] == classes
    for row in rows:
        k = row["classes"]
        if full:
            het_extra = (dim + 1) * (factors + 1) * k + tau
            hetxl_extra = (dim + 1) * (factors + 1) * dim + tau
        else:
            het_extra = (2 * dim + factors + 3) * k + tau
            hetxl_extra = 2 * dim**2 + (factors + 3) * dim + tau
        assert row == {
            "classes": k,
            "det_params": dim * k + k,
            "het_extra_params": het_extra,
            "hetxl_extra_params": hetxl_extra,
            "ratio": pytest.approx(het_extra / hetxl_extra),
        }


def test_small_check_as_a_subprocess():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.param_table",
            "--dim",
            "16",
            "--classes",
            "40",
            "--factors",
            "3",
            "--temperature",
            "fixed",
            "--json",
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    (row,) = json.loads(out)
    assert (row["det_params"], row["het_extra_params"], row["hetxl_extra_params"]) == (
        680,
        1520,
        608,
    )


def test_table_output_lists_every_k(capsys):
    param_table.main(["--dim", "8", "--classes", "10", "20", "--factors", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[0] == "classes"
    assert [line.split()[0] for line in lines[2:]] == ["10", "20"]


def test_bad_arguments_name_the_culprit(capsys):
    with pytest.raises(SystemExit):
        param_table.main(["--dim", "8", "--classes", "0", "--factors", "2"])
    assert "--classes" in capsys.readouterr().err
