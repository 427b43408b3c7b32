"""tools.mutation_check: the list of planted bugs is well formed and applies to this tree.

Only the plumbing is tested here (no pytest runs inside pytest): running the list itself is
`python -m tools.mutation_check`.
"""

import filecmp
import re
import sys

import pytest

from tests import REPO
from tools import mutation_check
from tools.planted_bugs import MUTATIONS, Mutation


def test_the_list_is_large_unique_and_complete():
    assert len(MUTATIONS) >= 20
    names = [m.name for m in MUTATIONS]
    assert len(set(names)) == len(names)
    for mutation in MUTATIONS:
        assert re.fullmatch(r"[a-z0-9_]+", mutation.name), mutation.name
        assert mutation.tests, mutation.name
        assert mutation.original != mutation.replacement, mutation.name


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.name)
def test_every_original_snippet_occurs_exactly_once(mutation):
    text = (REPO / mutation.path).read_text()
    assert text.count(mutation.original) == 1
    assert mutation_check.snippet_problem(mutation, REPO) is None


def test_every_selected_test_exists():
    for mutation in MUTATIONS:
        for node in mutation.tests:
            path, _, function = node.partition("::")
            assert (REPO / path).is_file(), (mutation.name, path)
            if function:
                name = function.split("[")[0]
                source = (REPO / path).read_text()
                assert re.search(rf"^def {name}\(", source, re.M), (mutation.name, node)


def test_the_copy_leaves_out_the_environment_and_caches(tmp_path):
    source = tmp_path / "source"
    for relative in ("pkg/module.py", ".venv/bin/python", ".git/HEAD", "pkg/__pycache__/m.pyc"):
        (source / relative).parent.mkdir(parents=True, exist_ok=True)
        (source / relative).write_text(relative)
    mutation_check.copy_tree(source, tmp_path / "copy")
    copied = sorted(
        p.relative_to(tmp_path / "copy").as_posix() for p in (tmp_path / "copy").rglob("*")
    )
    assert copied == ["pkg", "pkg/module.py"]


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """Two copies of the working tree: one left pristine, one to mutate."""
    root = tmp_path_factory.mktemp("mutation")
    for name in ("pristine", "work"):
        mutation_check.copy_tree(REPO, root / name)
    return root / "pristine", root / "work"


def differing_files(left, right):
    """Relative paths of the files that differ between two trees (or exist in one only)."""
    files = {p.relative_to(left).as_posix() for p in left.rglob("*") if p.is_file()}
    files |= {p.relative_to(right).as_posix() for p in right.rglob("*") if p.is_file()}
    return sorted(
        name
        for name in files
        if not (left / name).is_file()
        or not (right / name).is_file()
        or not filecmp.cmp(left / name, right / name, shallow=False)
    )


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.name)
def test_applying_a_mutation_changes_exactly_its_file(trees, mutation):
    pristine, work = trees
    original = mutation_check.apply_mutation(mutation, work)
    try:
        assert differing_files(pristine, work) == [mutation.path]
        mutated = (work / mutation.path).read_text()
        assert mutated == original.replace(mutation.original, mutation.replacement)
    finally:
        (work / mutation.path).write_text(original)
    assert differing_files(pristine, work) == []


def test_a_stale_snippet_fails_loudly(tmp_path, monkeypatch, capsys):
    (tmp_path / "module.py").write_text("x = 1\ny = 1\n")
    missing = Mutation("missing", "module.py", "z = 1", "z = 2", ("tests",))
    twice = Mutation("twice", "module.py", " = 1", " = 2", ("tests",))
    for mutation, count in ((missing, 0), (twice, 2)):
        with pytest.raises(mutation_check.StaleMutation, match=f"occurs {count} times"):
            mutation_check.apply_mutation(mutation, tmp_path)
    assert (tmp_path / "module.py").read_text() == "x = 1\ny = 1\n"
    stale = Mutation("stale", "contrastive/losses/clip.py", "no such line", "x", ("tests",))
    monkeypatch.setattr(mutation_check, "MUTATIONS", (*MUTATIONS, stale))
    assert mutation_check.main(["--list"]) == 1
    assert "STALE stale: the original snippet occurs 0 times" in capsys.readouterr().err


def test_list_and_only(capsys):
    assert mutation_check.main(["--list"]) == 0
    listed = capsys.readouterr().out
    for mutation in MUTATIONS:
        assert f"{mutation.name}\n    {mutation.path}\n" in listed
    first = MUTATIONS[0].name
    assert mutation_check.main(["--list", "--only", first]) == 0
    assert capsys.readouterr().out.splitlines()[0] == first
    with pytest.raises(SystemExit) as error:
        mutation_check.main(["--only", "no_such_mutation"])
    assert error.value.code == 2
    assert "no_such_mutation" in capsys.readouterr().err


def test_pytest_exit_codes_map_to_outcomes():
    # 1: a test failed; 2: collection failed (the mutated module does not import).
    assert [mutation_check.outcome(code) for code in (0, 1, 2, 5, 3, None)] == [
        "SURVIVED",
        "killed",
        "killed",
        "NO TESTS",
        "ERROR (3)",
        "TIMEOUT",
    ]


def test_pytest_command_uses_this_interpreter_stops_at_the_first_failure_and_selects():
    command = mutation_check.pytest_command(["tests/a.py::test_b"], k="not slow")
    assert command[0] == sys.executable
    assert command[1:5] == ["-m", "pytest", "-x", "-q"]
    assert command[-3:] == ["tests/a.py::test_b", "-k", "not slow"]


def test_baseline_runs_each_distinct_selection_once():
    mutations = [
        Mutation("a", "f.py", "1", "2", ("t1.py", "t2.py")),
        Mutation("b", "f.py", "3", "4", ("t2.py", "t3.py")),
        Mutation("c", "f.py", "5", "6", ("t1.py",), k="fast"),
    ]
    assert mutation_check.baseline_groups(mutations) == {
        None: ["t1.py", "t2.py", "t3.py"],
        "fast": ["t1.py"],
    }
