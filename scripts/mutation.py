"""Mutation testing of the decision and maths code (issue 17), with a time budget; not part of CI.

    python -m scripts.mutation [--budget-minutes 60] [--max-children 2] [--keep] [NAME_OR_GLOB ...]

Runs mutmut (a test-only tool: installed into the running interpreter, `pip install mutmut==3.8.1`, when
missing) with the `[tool.mutmut]` settings of pyproject.toml: mutmut mutates whole files, this script runs only
the mutants of the functions in SCOPE (or the names / globs given, e.g. the survivors of an earlier run). At the
budget mutmut is interrupted; the mutants it has not reached count as "not checked". Prints, over the scope:
mutants total, killed, survived, timeout, no tests, not checked, the score ((killed + timeout) / checked) and the
score with the survivors listed in EQUIVALENT counted apart (docs/testing.md, "Mutation testing", explains each).
Writes out/mutation/summary.json, out/mutation/survivors.txt (every survivor's diff) and out/mutation/mutmut.log,
then removes mutants/ (unless --keep). Exit status: 0 if the score without the equivalent mutants reaches
--target (default 90 %), 1 if it does not, 2 if the budget ran out first.
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "out" / "mutation"
MUTMUT_VERSION = "3.8.1"

# The decision / maths functions, as mutmut mutant-name globs (module.x_function or module.xǁClassǁmethod).
_S = "ǁ"
SCOPE = [
    # Taylor forecast (the whole file) and the torch maths of kernels.py: the fallbacks, the stack forecast's sum,
    # the verification's forecast and its sums-to-errors step (the dispatchers, whose other branch is Triton on
    # CUDA, are left out: on the CPU that branch never runs; scripts/gpu_kernel_tests.sh compares the kernels)
    "accel.taylor.*",
    "accel.kernels.x_torch_accumulate__mutmut_*",
    "accel.kernels.x_add_terms__mutmut_*",
    "accel.kernels.x_torch_taylor_update__mutmut_*",
    "accel.kernels.x_torch_forecast__mutmut_*",
    "accel.kernels.x_errors_from_sums__mutmut_*",
    # verification metrics (the whole file), the lab's image metrics
    "accel.metrics.*",
    "lab.compare.x__batch__mutmut_*",
    "lab.compare.x__same_shape__mutmut_*",
    "lab.compare.x_psnr__mutmut_*",
    "lab.compare.x_ssim__mutmut_*",
    # SpeCa: threshold schedule, step plan and verdict, the errors read into the trace, verification, the
    # forecasts (stack: recorded streams and their differences; per block: gates, contributions)
    f"accel.speca.x{_S}SpeCaConfig{_S}threshold_at__mutmut_*",
    "accel.speca.x__read_errors__mutmut_*",
    f"accel.speca.x{_S}SpeCaModelHook{_S}_plan__mutmut_*",
    f"accel.speca.x{_S}SpeCaModelHook{_S}_full__mutmut_*",
    f"accel.speca.x{_S}SpeCaModelHook{_S}run_step__mutmut_*",
    f"accel.speca.x{_S}SpeCaModelHook{_S}_spec_block__mutmut_*",
    f"accel.speca.x{_S}SpeCaModelHook{_S}_full_per_block__mutmut_*",
    f"accel.speca.x{_S}SpeCaModelHook{_S}_full_stack_block__mutmut_*",
    f"accel.speca.x{_S}SpeCaModelHook{_S}_update_stack__mutmut_*",
    f"accel.speca.x{_S}SpeCaModelHook{_S}_entries__mutmut_*",
    f"accel.speca.x{_S}SpeCaModelHook{_S}all_gates__mutmut_*",
    # SpecDiff: C1 size, levels, scores, C3 weights, schedule, full / partial steps, the speculative pre-run
    f"accel.specdiff.x{_S}SpecDiffConfig{_S}n_computed__mutmut_*",
    "accel.specdiff.x_history_weights__mutmut_*",
    "accel.specdiff.x_normalise_scores__mutmut_*",
    "accel.specdiff.x_assign_levels__mutmut_*",
    f"accel.specdiff.x{_S}SpecDiffModelHook{_S}_scheduled_partial__mutmut_*",
    f"accel.specdiff.x{_S}SpecDiffModelHook{_S}_plan__mutmut_*",
    f"accel.specdiff.x{_S}SpecDiffModelHook{_S}run_step__mutmut_*",
    f"accel.specdiff.x{_S}SpecDiffModelHook{_S}_after_full__mutmut_*",
    f"accel.specdiff.x{_S}SpecDiffModelHook{_S}_partial_step__mutmut_*",
    f"accel.specdiff.x{_S}SpecDiffModelHook{_S}_prerun__mutmut_*",
]

# Survivors that cannot change behaviour, as (mutant-name glob of the function, the mutated line as mutmut
# shows it, whitespace-normalised). Mutant numbers move when a file changes; the line does not. Each entry is
# explained in docs/testing.md ("Mutation testing", equivalent mutants).
EQUIVALENT: list[tuple[str, str]] = []

STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
          -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout", None: "not checked"}


def in_scope(name: str, globs: list[str]) -> bool:
    return any(name == g or fnmatch.fnmatchcase(name, g) for g in globs)


def ensure_mutmut(python: str) -> Path:
    """The mutmut entry point next to `python`, installed there (pinned) when missing."""
    probe = subprocess.run([python, "-c", "import mutmut, sys; sys.stdout.write(mutmut.__version__)"],
                           capture_output=True, text=True)
    if probe.returncode != 0 or probe.stdout.strip() != MUTMUT_VERSION:
        print(f"installing mutmut=={MUTMUT_VERSION} into {sys.prefix}", flush=True)
        subprocess.run([python, "-m", "pip", "install", "-q", f"mutmut=={MUTMUT_VERSION}"], check=True)
    exe = Path(python).parent / "mutmut"
    if not exe.exists():
        raise SystemExit(f"no mutmut entry point at {exe}")
    return exe


def run_mutmut(exe: Path, names: list[str], budget_s: float, max_children: int, log: Path) -> str:
    """mutmut run on `names`: "finished", "budget" (stopped at the budget) or "interrupted" (this script was)."""
    cmd = [str(exe), "run", "--max-children", str(max_children), *names]
    print(f"$ {' '.join(cmd[:4])} <{len(names)} names/globs>   (log: {log.relative_to(ROOT)})", flush=True)
    # One torch thread per worker: on a loaded CPU, OpenMP threads spin-wait and a test run takes 5x the CPU time
    # (mutmut's timeouts count CPU seconds).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        outcome = "budget"
        try:
            deadline = time.monotonic() + budget_s
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(2)
            if proc.poll() is not None:
                return "finished"
            print(f"budget of {budget_s / 60:g} min reached: stopping mutmut", flush=True)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: stop mutmut, then report what it did
            outcome = "interrupted"
            print("interrupted: stopping mutmut", flush=True)
        # Every result is saved to mutants/ as soon as it is known: the mutants still running are lost, the others
        # count as not checked.
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return outcome


def load_results(globs: list[str]) -> dict[str, str]:
    """mutant name -> status, for the mutants in scope, from mutmut's per-file .meta files."""
    res = {}
    for meta in glob.glob(str(ROOT / "mutants" / "**" / "*.py.meta"), recursive=True):
        with open(meta) as f:
            codes = json.load(f)["exit_code_by_key"]
        for name, code in codes.items():
            if in_scope(name, globs):
                res[name] = STATUS.get(code, "suspicious")
    return res


def show(exe: Path, name: str) -> str:
    return subprocess.run([str(exe), "show", name], cwd=ROOT, capture_output=True, text=True).stdout


def mutated_lines(diff: str) -> list[str]:
    return [" ".join(line[1:].split()) for line in diff.splitlines()
            if line.startswith("+") and not line.startswith("+++")]


def is_equivalent(name: str, diff: str) -> bool:
    lines = mutated_lines(diff)
    return any(fnmatch.fnmatchcase(name, g) and line in lines for g, line in EQUIVALENT)


def _stop(signum, frame):
    raise KeyboardInterrupt


def fingerprint() -> str:
    """Hash of the mutated files and the scope: mutant names only mean the same mutants while it holds."""
    h = hashlib.sha256(repr(SCOPE).encode())
    for pattern in _only_mutate():
        for path in sorted(glob.glob(str(ROOT / pattern))):
            h.update(Path(path).read_bytes())
    return h.hexdigest()[:16]


def _only_mutate() -> list[str]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]["only_mutate"]


def main(argv=None) -> int:
    signal.signal(signal.SIGTERM, _stop)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="mutant names or globs (default: SCOPE)")
    ap.add_argument("--budget-minutes", type=float, default=60.0)
    ap.add_argument("--max-children", type=int, default=2, help="parallel mutmut workers (default 2)")
    ap.add_argument("--target", type=float, default=90.0, help="score to reach, %% (default 90)")
    ap.add_argument("--keep", action="store_true", help="keep mutants/ (for `mutmut show` / `mutmut browse`)")
    ap.add_argument("--rerun", action="store_true",
                    help="run again only what the last run (out/mutation/results.json) did not kill (survived, no "
                         "tests, timeout, suspicious, not checked), e.g. after adding tests, and merge the results")
    ap.add_argument("--report-only", action="store_true", help="run nothing: report what mutants/ holds")
    args = ap.parse_args(argv)

    os.chdir(ROOT)
    exe = ensure_mutmut(sys.executable)
    OUT.mkdir(parents=True, exist_ok=True)
    results_path = OUT / "results.json"
    previous: dict[str, str] = {}
    globs = args.names or SCOPE
    if args.rerun:
        prev = json.loads(results_path.read_text())
        if prev["fingerprint"] != fingerprint():
            raise SystemExit("the mutated files or the scope changed since out/mutation/results.json: run them all")
        previous = prev["status"]
        globs = sorted(n for n, st in previous.items() if st not in ("killed", "caught by type check"))
        if not globs:
            print("nothing to run again: every mutant of the last run was killed")
            return 0
    t0 = time.monotonic()
    if args.report_only:
        outcome = "finished"
    else:
        shutil.rmtree(ROOT / "mutants", ignore_errors=True)  # results of an older tree would be stale
        outcome = run_mutmut(exe, globs, args.budget_minutes * 60, args.max_children, OUT / "mutmut.log")
    finished = outcome == "finished"
    minutes = (time.monotonic() - t0) / 60

    res = load_results(globs)
    if previous:  # a mutant this run did not reach keeps its earlier status
        res = {**previous, **{n: st for n, st in res.items() if st != "not checked"}}
    results_path.write_text(json.dumps({"fingerprint": fingerprint(), "status": res}, indent=0,
                                       ensure_ascii=False) + "\n")
    counts = Counter(res.values())
    survivors = sorted(n for n, st in res.items() if st == "survived")
    diffs = {n: show(exe, n) for n in survivors}
    equivalent = [n for n in survivors if is_equivalent(n, diffs[n])]
    with open(OUT / "survivors.txt", "w") as f:
        for n in survivors:
            f.write(("[equivalent] " if n in equivalent else "") + diffs[n].rstrip() + "\n\n")
        for st in ("no tests", "timeout", "suspicious", "skipped"):  # worth reading too
            for n in sorted(k for k, v in res.items() if v == st):
                f.write(f"[{st}] " + show(exe, n).rstrip() + "\n\n")

    total = len(res)
    killed, timeout = counts["killed"], counts["timeout"]
    checked = total - counts["not checked"]
    score = 100.0 * (killed + timeout) / checked if checked else 0.0
    adj = checked - len(equivalent)
    score_eq = 100.0 * (killed + timeout) / adj if adj else 0.0
    summary = {
        "outcome": outcome, "rerun": args.rerun, "minutes": round(minutes, 1), "budget_minutes": args.budget_minutes,
        "total": total, "killed": killed, "survived": counts["survived"], "equivalent": len(equivalent),
        "timeout": timeout, "no_tests": counts["no tests"], "suspicious": counts["suspicious"],
        "not_checked": counts["not checked"], "score": round(score, 2), "score_without_equivalent": round(score_eq, 2),
        "survivors": [n for n in survivors if n not in equivalent], "equivalent_mutants": equivalent,
    }
    (OUT / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    per_function = Counter(re.sub(r"__mutmut_\d+$", "", n) for n in survivors if n not in equivalent)
    for fn, k in sorted(per_function.items()):
        print(f"  survived {k:3d}  {fn}")
    stopped = {"finished": "finished", "budget": "STOPPED AT THE BUDGET", "interrupted": "INTERRUPTED"}[outcome]
    what = "re-run of the last run's survivors" if args.rerun else "mutation testing"
    print(f"{what} {stopped} in {minutes:.1f} min (budget {args.budget_minutes:g} min)")
    print(f"mutants total {total}  killed {killed}  survived {counts['survived']} (equivalent {len(equivalent)})  "
          f"timeout {timeout}  no tests {counts['no tests']}  suspicious {counts['suspicious']}  "
          f"not checked {counts['not checked']}")
    print(f"score {score:.1f} % of checked mutants killed; {score_eq:.1f} % without the equivalent ones "
          f"(target {args.target:g} %)")
    print(f"survivors' diffs: {(OUT / 'survivors.txt').relative_to(ROOT)}")
    if not args.keep:
        shutil.rmtree(ROOT / "mutants", ignore_errors=True)
    if not finished:
        return 2
    return 0 if score_eq >= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
