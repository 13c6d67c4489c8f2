"""Mutation check: every listed small breakage of the kernels, strategies and bank
must make the test suite fail.

    .venv/bin/python scripts/mutants.py              # every mutant (C++ ones rebuild: slow)
    .venv/bin/python scripts/mutants.py --list
    .venv/bin/python scripts/mutants.py --only bank --only feddyn
    .venv/bin/python scripts/mutants.py --no-cpp     # skip the mutants that need a rebuild

Each mutant is applied to a fresh copy of the source tree (never to this one), the
tests named for it run there (with the copy first on sys.path, and the copy's own
extension, rebuilt when the mutant edits C++), and the mutant is "killed" when they
fail. The unmutated copy must pass the same tests first. Exits 1 when a mutant
survives or no longer applies (its code changed: update the list in scripts/mutants.toml).
Run it before each release; it is too slow for every CI run.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIST = os.path.join(ROOT, "scripts", "mutants.toml")
SKIP = shutil.ignore_patterns(".git", ".venv*", "runs", "build", ".hypothesis", ".pytest_cache", "__pycache__",
                              "*.egg-info", "results.csv")


def load_mutants(path=LIST):
    with open(path, "rb") as fh:
        mutants = tomllib.load(fh)["mutant"]
    for m in mutants:
        missing = {"id", "file", "old", "new", "tests"} - set(m)
        if missing:
            raise ValueError(f"{path}: mutant {m.get('id', '?')} lacks {sorted(missing)}")
    return mutants


def copy_tree(dest):
    shutil.copytree(ROOT, dest, ignore=SKIP)


def apply(tree, mutant):
    """Replace the mutant's `old` text (which must occur exactly once) by `new`."""
    path = os.path.join(tree, mutant["file"])
    with open(path) as fh:
        text = fh.read()
    count = text.count(mutant["old"])
    if count != 1:
        return f"`old` occurs {count} times in {mutant['file']} (the code changed: update the mutant)"
    with open(path, "w") as fh:
        fh.write(text.replace(mutant["old"], mutant["new"]))
    return None


def rebuild(tree, python):
    res = subprocess.run([python, "setup.py", "build_ext", "--inplace", "-q"], cwd=tree, capture_output=True,
                         text=True, env={**os.environ, "OMNIFM_WITH_CUDA": "0"})
    if res.returncode != 0:
        raise RuntimeError(f"rebuild failed:\n{res.stderr[-2000:]}")


def run_tests(tree, python, tests, timeout):
    """True when the tests pass in `tree`."""
    env = {**os.environ, "PYTHONPATH": tree, "OMNIFM_HYPOTHESIS_PROFILE": "ci"}
    env.pop("OMNIFM_BACKEND", None)
    cmd = [python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests.split()]
    try:
        res = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False  # a hang counts as detected: CI would time out
    return res.returncode == 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", default=[], help="run mutants whose id contains this (repeatable)")
    p.add_argument("--no-cpp", action="store_true", help="skip mutants of C++ files (they need a rebuild)")
    p.add_argument("--list", action="store_true")
    p.add_argument("--timeout", type=int, default=900, help="seconds per test run")
    p.add_argument("--python", default=sys.executable)
    args = p.parse_args(argv)

    mutants = load_mutants()
    if args.only:
        mutants = [m for m in mutants if any(s in m["id"] for s in args.only)]
    if args.no_cpp:
        mutants = [m for m in mutants if not m["file"].startswith("csrc/")]
    if args.list:
        for m in mutants:
            print(f"{m['id']:<40} {m['file']}")
        return 0

    results, failed = [], False
    with tempfile.TemporaryDirectory(prefix="omnifm_mutants_") as tmp:
        clean = os.path.join(tmp, "clean")
        copy_tree(clean)
        # The unmutated tree must pass each distinct test selection first.
        for tests in sorted({m["tests"] for m in mutants}):
            if not run_tests(clean, args.python, tests, args.timeout):
                print(f"the unmutated tree fails: {tests}", file=sys.stderr)
                return 1
        for m in mutants:
            t0 = time.perf_counter()
            tree = os.path.join(tmp, m["id"])
            copy_tree(tree)
            why = apply(tree, m)
            if why is None and m["file"].startswith("csrc/"):
                rebuild(tree, args.python)
            status = "STALE" if why else ("killed" if not run_tests(tree, args.python, m["tests"], args.timeout)
                                          else "SURVIVED")
            failed |= status != "killed"
            results.append((m["id"], status, time.perf_counter() - t0, why or ""))
            print(f"{m['id']:<40} {status:<9} {results[-1][2]:6.1f}s {why or ''}", flush=True)
            shutil.rmtree(tree, ignore_errors=True)
    killed = sum(r[1] == "killed" for r in results)
    print(f"\n{killed}/{len(results)} mutants killed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
