#!/usr/bin/env bash
# Every GPU check in one call, on one CUDA GPU, in under 5 minutes: the gpu-marked tests and the
# random Llama-3-8B benchmark (ours vs transformers + bitsandbytes + PEFT).
#
#   bash scripts/gpu_check.sh                      # all parts (tests, bench)
#   bash scripts/gpu_check.sh --parts tests        # some of them: tests, bench (comma-separated)
#   bash scripts/gpu_check.sh --dry-run            # on a CPU (CI): each part's command parses, the wheels the
#                                                  # GPU needs are at hand, and the tests' bodies run at tiny shapes
#   bash scripts/gpu_check.sh --rehearse           # the GPU run's own flow on CPU at tiny shapes (~2 min), to
#                                                  # try this script's orchestration and report without a GPU
#   options: --budget SECONDS (default 290: the whole run, install included), --out FILE
#
# On the lent GPU machine (../shared/gpu/README.md): fill .whl/ here first (../shared/gpu/prepare-wheels.sh),
# then call the device tool with carry [".whl"] and the command `bash scripts/gpu_check.sh`.
# The results go to $OUT/gpu-<device>.json when OUT is set (the device tool brings $OUT back), else to
# bench/results/gpu-<device>.json, <device> being torch.cuda.get_device_name() slugged (nvidia-h200).
# Logs of each part go next to it under $OUT, or to a temporary folder whose path is printed.
# Exit status: 0 when every selected part passed, 1 when one failed, 2 on bad usage or a failed setup.
set -euo pipefail
cd "$(dirname "$0")/.."

parts="tests,bench"
dry_run=0
rehearse=0
budget=290
out_file=""
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --parts) parts="${2:?--parts needs a list, e.g. tests,bench}"; shift 2 ;;
    --parts=*) parts="${1#--parts=}"; shift ;;
    --dry-run) dry_run=1; shift ;;
    --rehearse) rehearse=1; shift ;;
    --budget) budget="${2:?--budget needs seconds}"; shift 2 ;;
    --out) out_file="${2:?--out needs a file}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
want_tests=0 want_bench=0
IFS=',' read -r -a wanted <<<"$parts"
for part in "${wanted[@]}"; do
  case "$part" in
    tests) want_tests=1 ;;
    bench) want_bench=1 ;;
    *) echo "gpu_check: unknown part '$part'; parts are tests, bench" >&2; exit 2 ;;
  esac
done
[[ $want_tests == 1 || $want_bench == 1 ]] || { echo "gpu_check: --parts selects nothing" >&2; exit 2; }
[[ $budget =~ ^[0-9]+$ ]] || { echo "gpu_check: --budget $budget is not a number of seconds" >&2; exit 2; }

# The project's venv here; the image's python3 on the GPU machine (the venv is not carried there).
if [[ -n ${PYTHON:-} ]]; then py=$PYTHON
elif [[ -x .venv/bin/python ]]; then py=.venv/bin/python
else py=python3
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
trap 'rm -rf "$work"' EXIT
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

# The helper that checks wheels, reads the machine and writes the report: stdlib and packaging only.
helper="$work/gpu_check_helper.py"
cat >"$helper" <<'PY'
"""gpu_check.sh's helper: wheels, preflight, report (see the script's header)."""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename

# What the GPU image lacks (../shared/gpu/README.md), by distribution and import name.
NEEDED = {
    "bitsandbytes": "bitsandbytes",
    "hydra-core": "hydra",
    "omegaconf": "omegaconf",
    "antlr4-python3-runtime": "antlr4",
    "gguf": "gguf",
}
# hydra-core's own pins for its two dependencies, used when no hydra-core metadata is at hand.
HYDRA_FALLBACK = {"omegaconf": ">=2.2,<2.4", "antlr4-python3-runtime": "==4.9.*"}
TARGET_PYTHON = "cp312"  # the GPU image's Python 3.12 on x86-64 Linux


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def pyproject_specs(path: Path) -> dict[str, SpecifierSet]:
    text = path.read_text()
    try:
        import tomllib

        deps = tomllib.loads(text)["project"]["dependencies"]
    except ModuleNotFoundError:  # Python 3.10: the dependency strings are plain quoted lines
        block = text.split("dependencies = [", 1)[1].split("]", 1)[0]
        deps = re.findall(r'^\s*"([^"]+)"', block, re.MULTILINE)
    return {canonicalize_name(r.name): r.specifier for r in map(Requirement, deps)}


def hydra_requires(whl_dir: Path) -> list[str]:
    """hydra-core's Requires-Dist: from its wheel in .whl/, else from the installed hydra-core."""
    import zipfile

    for wheel in sorted(whl_dir.glob("hydra_core-*.whl")):
        if not zipfile.is_zipfile(wheel):
            continue  # cmd_wheels reports it
        with zipfile.ZipFile(wheel) as zf:
            meta = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
            text = zf.read(meta[0]).decode() if meta else ""
        return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]
    try:
        return importlib.metadata.requires("hydra-core") or []
    except importlib.metadata.PackageNotFoundError:
        return []


def wanted_specs(pyproject: Path, whl_dir: Path) -> dict[str, tuple[SpecifierSet, str]]:
    """Each needed package's allowed versions, and where that range comes from."""
    direct = pyproject_specs(pyproject)
    via_hydra = {}
    for line in hydra_requires(whl_dir):
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate():
            via_hydra[canonicalize_name(req.name)] = req.specifier
    out = {}
    for name in NEEDED:
        key = canonicalize_name(name)
        if key in direct:
            out[name] = (direct[key], "pyproject.toml")
        elif key in via_hydra:
            out[name] = (via_hydra[key], "hydra-core's requirements")
        else:
            out[name] = (SpecifierSet(HYDRA_FALLBACK[name]), "hydra-core 1.3's requirements")
    return out


def fits_gpu_python(tags) -> bool:
    for tag in tags:
        interp_ok = tag.interpreter in ("py3", "py312", TARGET_PYTHON)
        abi_ok = tag.abi in ("none", "abi3", TARGET_PYTHON)
        plat_ok = tag.platform == "any" or (tag.platform.startswith("manylinux") and tag.platform.endswith("x86_64"))
        if interp_ok and abi_ok and plat_ok:
            return True
    return False


def cmd_wheels(args: argparse.Namespace) -> int:
    """One line per needed package: in .whl/ (one version, fit for the GPU's Python) or installed, in range."""
    import zipfile

    whl_dir = Path(args.whl_dir)
    wheels: dict[str, list[tuple[Path, object, object]]] = {}
    for wheel in sorted(whl_dir.glob("*.whl")) if whl_dir.is_dir() else []:
        try:
            name, version, _, tags = parse_wheel_filename(wheel.name)
        except ValueError as err:
            print(f"FAIL wheel {wheel.name}: not a wheel's file name ({err})")
            return 1
        if not zipfile.is_zipfile(wheel):
            print(f"FAIL wheel {wheel.name}: not a zip archive (a broken download?); fetch it again")
            return 1
        wheels.setdefault(canonicalize_name(name), []).append((wheel, version, tags))
    for name, found in wheels.items():
        if len(found) > 1:  # pip refuses to install two versions of one package at once
            print(f"FAIL wheel {name}: {len(found)} versions in {whl_dir}/ ({', '.join(str(v) for _, v, _ in found)})")
            return 1
    failed = 0
    specs = wanted_specs(Path(args.pyproject), whl_dir)
    for name, module in NEEDED.items():
        spec, source = specs[name]
        allowed = f"{spec or 'any'} ({source})"
        found = wheels.get(canonicalize_name(name))
        if found:
            wheel, version, tags = found[0]
            if version not in spec:
                reason = f"{wheel.name} is {version}, outside {allowed}"
            elif not fits_gpu_python(tags):
                reason = f"{wheel.name} does not install on the GPU's Python 3.12 x86-64"
            else:
                print(f"ok   wheel {name} {version} in {whl_dir}/, allowed {allowed}")
                continue
        else:
            try:
                version = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                version = None
            if version is None or importlib.util.find_spec(module) is None:
                reason = f"neither in {whl_dir}/ nor importable here; run ../shared/gpu/prepare-wheels.sh"
            elif version not in spec:
                reason = f"not in {whl_dir}/, and the installed {version} is outside {allowed}"
            else:
                print(f"ok   wheel {name} {version} importable here (not in {whl_dir}/), allowed {allowed}")
                continue
        print(f"FAIL wheel {name}: {reason}")
        failed += 1
    return 1 if failed else 0


def versions() -> dict[str, str | None]:
    out = {}
    for name in ("torch", "lightning", "transformers", "peft", "accelerate", "torchmetrics", "pytest", *NEEDED):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def cmd_preflight(args: argparse.Namespace) -> int:
    """The machine, as JSON to --out; exit 2 with one line when there is no GPU or a needed import fails."""
    import platform

    env: dict[str, object] = {"python": platform.python_version(), "versions": versions(), "problems": []}
    try:
        import torch

        env["cuda_available"] = torch.cuda.is_available()
        env["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            env["device"] = torch.cuda.get_device_name(0)
            env["capability"] = f"{props.major}.{props.minor}"
            env["memory_gib"] = round(props.total_memory / 2**30, 1)
            env["bf16"] = torch.cuda.is_bf16_supported()
        elif not args.dry_run:
            env["problems"].append("no CUDA device is visible to torch")
    except Exception as err:  # noqa: BLE001 - any failure here is the one line to report
        env["problems"].append(f"import torch failed: {err}")
    if not args.dry_run:
        for module in ("bitsandbytes", "lightning_qlora", "peft", "lightning", "pytest"):
            try:
                __import__(module)
            except Exception as err:  # noqa: BLE001
                env["problems"].append(f"import {module} failed: {type(err).__name__}: {err}")
    env["device"] = env.get("device") or "cpu"
    env["slug"] = slug(str(env["device"]))
    Path(args.out).write_text(json.dumps(env, indent=2))
    if env["problems"]:
        print(f"gpu_check: preflight failed: {'; '.join(env['problems'])}")
        return 2
    print(f"gpu_check: {env['device']} ({env['slug']}), torch {env['versions']['torch']}, CUDA {env.get('torch_cuda')}")
    return 0


def _value(text: str | None):
    try:
        return json.loads(text) if text is not None else None
    except ValueError:
        return text


def parse_junit(path: Path) -> list[dict]:
    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        if not case.get("classname"):  # a module that failed to import: pytest names it, not a test
            node = case.find("error")
            message = (node.text or node.get("message") or "").strip() if node is not None else ""
            tests.append(
                {
                    "test": case.get("file") or case.get("name"),
                    "outcome": "collection_error",
                    "message": message[-2000:],
                }
            )
            continue
        module = case.get("classname", "").replace(".", "/")
        entry = {"test": f"{module}.py::{case.get('name')}", "seconds": round(float(case.get("time") or 0), 2)}
        entry["outcome"] = "passed"
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                entry["outcome"] = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                entry["message"] = (node.get("message") or node.text or "").strip()[:2000]
                break
        props = {p.get("name"): _value(p.get("value")) for p in case.iter("property")}
        if props:
            entry["properties"] = props
        tests.append(entry)
    return tests


def parse_log(path: Path) -> list[dict]:
    """From ``pytest -v`` lines, when the run was killed before writing its JUnit file."""
    tests, last = [], None
    pattern = re.compile(r"^(tests/\S+::\S+)\s+(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)")
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        match = pattern.match(line)
        if match:
            tests.append({"test": match.group(1), "outcome": match.group(2).lower()})
            last = None
        elif re.match(r"^tests/\S+::\S+", line):
            last = line.split()[0]  # started, no outcome yet
    if last:
        tests.append({"test": last, "outcome": "timeout", "message": "still running when the time limit hit"})
    return tests


def tests_part(args: argparse.Namespace) -> dict:
    junit = Path(args.junit)
    tests = parse_junit(junit) if junit.is_file() and junit.stat().st_size else parse_log(Path(args.tests_log))
    counts: dict[str, int] = {}
    for t in tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    bad = [t for t in tests if t["outcome"] in ("failed", "error", "timeout", "xpass")]
    # Another module failing to import (a package this image lacks) costs only its own tests; ours may not.
    bad += [t for t in tests if t["outcome"] == "collection_error" and t["test"].endswith("test_gpu.py")]
    if args.dry_run:
        # Each body ran on CPU, or stopped at a skip that says why; the FSDP one needs CUDA outright.
        bad += [
            t
            for t in tests
            if t["outcome"] == "skipped" and "test_gpu.py" in t["test"] and "CPU dry run" not in t.get("message", "")
        ]
    rc = int(args.tests_rc)
    ran = [t for t in tests if t["outcome"] != "collection_error"]
    if rc == 124:
        status = "timeout"
    elif bad or rc not in (0, 1, 5) or not ran:  # 1: some test failed, or a module did not import
        status = "failed"
    elif not counts.get("passed"):
        status = "failed"  # everything skipped: nothing was checked
    else:
        status = "passed"
    return {
        "status": status,
        "exit_code": rc,
        "seconds": float(args.tests_seconds),
        "collected": len(ran),
        "counts": counts,
        "tests": tests,
    }


def bench_part(args: argparse.Namespace) -> dict:
    rc = int(args.bench_rc)
    part: dict[str, object] = {"exit_code": rc, "seconds": float(args.bench_seconds)}
    path = Path(args.bench_json)
    result = json.loads(path.read_text()) if path.is_file() else None
    if result:
        summary = {}
        for side in ("ours", "peer"):
            s = result.get(side) or {}
            keys = ("median_step_s", "tokens_per_s", "train_peak_gpu_mib", "peak_gpu_mib", "setup_s", "first_loss")
            summary[side] = {k: s.get(k) for k in keys}
        summary["ratio_ours_over_peer"] = result.get("ratio_ours_over_peer")
        summary["first_loss_abs_diff"] = result.get("first_loss_abs_diff")
        part["summary"] = summary
        part["result"] = result
    both = bool(result) and all((result.get(s) or {}).get("runs") for s in ("ours", "peer"))
    part["status"] = "timeout" if rc == 124 else ("passed" if rc == 0 and both else "failed")
    return part


def _fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def cmd_report(args: argparse.Namespace) -> int:
    env = json.loads(Path(args.env).read_text())
    report = {
        "check": "scripts/gpu_check.sh" + (" --dry-run" if args.dry_run else ""),
        "device": env.get("device"),
        "machine": env,
        "git_commit": args.commit or None,
        "date": args.date,
        "budget_s": int(args.budget),
        "total_s": float(args.total_seconds),
        "parts": {},
    }
    if args.tests_rc is not None:
        report["parts"]["tests"] = tests_part(args)
    if args.bench_rc is not None:
        report["parts"]["bench"] = bench_part(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    json.loads(Path(args.out).read_text())  # it reads back
    failed = 0
    for name, part in report["parts"].items():
        if name == "tests":
            for t in part["tests"]:
                word = {"passed": "ok  ", "skipped": "skip", "collection_error": "warn"}.get(t["outcome"], "FAIL")
                if t["outcome"] == "collection_error" and t["test"].endswith("test_gpu.py"):
                    word = "FAIL"
                why = f": {t['message'].splitlines()[0][:160]}" if t.get("message") else ""
                took = f" ({t['seconds']:.1f} s)" if "seconds" in t else ""
                print(f"{word} test {t['test']} {t['outcome']}{took}{why}")
            word = "ok  " if part["status"] == "passed" else "FAIL"
            print(f"{word} part tests: {part['status']}, pytest -m gpu collected {part['collected']}: {part['counts']}")
        else:
            s = part.get("summary") or {}
            figures = ", ".join(
                f"{side} {_fmt(v.get('median_step_s'), 3)} s/step, {_fmt(v.get('tokens_per_s'), 0)} tok/s,"
                f" peak {_fmt(v.get('peak_gpu_mib'), 0)} MiB"
                for side, v in s.items()
                if side in ("ours", "peer") and v
            )
            print(f"{'ok  ' if part['status'] == 'passed' else 'FAIL'} part bench: {part['status']} {figures}")
        failed += part["status"] != "passed"
    print(f"report: {args.out}")
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wheels")
    w.add_argument("--whl-dir", default=".whl")
    w.add_argument("--pyproject", default="pyproject.toml")
    f = sub.add_parser("preflight")
    f.add_argument("--out", required=True)
    f.add_argument("--dry-run", action="store_true")
    r = sub.add_parser("report")
    for name in ("env", "out", "junit", "tests-log", "bench-json", "commit", "date", "budget", "total-seconds"):
        r.add_argument(f"--{name}", default="")
    for name in ("tests-rc", "tests-seconds", "bench-rc", "bench-seconds"):
        r.add_argument(f"--{name}", default=None)
    r.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    return {"wheels": cmd_wheels, "preflight": cmd_preflight, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
PY

start=$SECONDS
left() { echo $((budget - (SECONDS - start))); }
commit=$(git rev-parse --short HEAD 2>/dev/null || true)
today=$(date -u +%Y-%m-%dT%H:%M:%SZ)
# The tests part's command, the same in the dry run (there with LQ_GPU_CHECK_DEVICE=cpu): every
# gpu-marked test of the suite, each outcome into the JUnit file; a module that fails to import
# (a package the image lacks) costs its own tests, not the whole part.
# addopts is replaced: the suite's "-n 2" needs pytest-xdist, which the GPU image lacks, and the few
# gpu tests run one at a time on the one GPU.
tests_cmd=("$py" -m pytest -m gpu -p no:cacheprovider -o addopts= -v -rA --continue-on-collection-errors
  -o junit_family=xunit1 --junitxml="$work/junit.xml")

if [[ $dry_run == 1 ]]; then
  # ---- Dry run: on a CPU, in about a minute. One line per check; the first failure's reason last.
  failures=()
  say() { echo "[dry-run] $*"; }
  fail() { say "FAIL $*"; failures+=("$*"); }
  # Relay a helper's "ok/skip/FAIL ..." lines as checks; a non-zero exit without a FAIL line is one too.
  relay() {
    local log=$1 rc=$2 what=$3 line failed=0
    while IFS= read -r line; do
      case "$line" in
        ok*|skip*|warn*) say "$line" ;;
        FAIL*) fail "${line#FAIL }"; failed=1 ;;
        report:*) say "ok   report written and read back: ${line#report: }" ;;
        *) say "     $line" ;;
      esac
    done <"$log"
    if [[ $rc != 0 && $failed == 0 ]]; then fail "$what exited $rc: $(tail -1 "$log")"; fi
  }
  for f in tests/test_gpu.py bench/run.py bench/worker.py; do
    if [[ -f $f ]]; then say "ok   part file $f"; else fail "part file $f is missing"; fi
  done
  # The bench part's checks run in the background while the test bodies run.
  "$py" bench/run.py gpu --help >"$work/bench-help.log" 2>&1 & help_pid=$!
  "$py" bench/worker.py gpu-paths >"$work/gpu-paths.log" 2>&1 & paths_pid=$!
  if "$py" "$helper" wheels >"$work/wheels.log" 2>&1; then rc=0; else rc=$?; fi
  relay "$work/wheels.log" "$rc" "wheel check"
  "$py" "$helper" preflight --dry-run --out "$work/env.json" >"$work/preflight.log" 2>&1 \
    || fail "preflight: $(tail -1 "$work/preflight.log")"
  # The tests part's own command: it collects the gpu tests, and tests/test_gpu.py's bodies run on
  # CPU at tiny shapes (what only CUDA has is skipped there, saying so).
  t0=$SECONDS
  if LQ_GPU_CHECK_DEVICE=cpu timeout -k 10 300 "${tests_cmd[@]}" >"$work/tests.log" 2>&1; then rc=0; else rc=$?; fi
  if "$py" "$helper" report --dry-run --env "$work/env.json" --out "$work/report/gpu-cpu.json" \
    --junit "$work/junit.xml" --tests-log "$work/tests.log" --tests-rc "$rc" \
    --tests-seconds $((SECONDS - t0)) --commit "$commit" --date "$today" --budget "$budget" \
    --total-seconds $((SECONDS - start)) >"$work/report.log" 2>&1; then rc=0; else rc=$?; fi
  relay "$work/report.log" "$rc" "report"
  [[ $rc == 0 ]] || say "     pytest's last lines: $(tail -3 "$work/tests.log" | tr '\n' ' ')"

  if wait "$help_pid" && grep -q -- "--runs" "$work/bench-help.log"; then
    say "ok   part bench: bench/run.py gpu --help parses"
  else
    fail "bench/run.py gpu --help: $(tail -1 "$work/bench-help.log")"
  fi
  if wait "$paths_pid"; then
    say "ok   part bench: the worker's GPU paths import: $(tail -1 "$work/gpu-paths.log" | cut -c1-120)"
  else
    fail "bench/worker.py gpu-paths: $(tail -1 "$work/gpu-paths.log")"
  fi
  if [[ ${#failures[@]} -gt 0 ]]; then
    echo "gpu_check --dry-run failed (${#failures[@]} checks): ${failures[0]}" >&2
    exit 1
  fi
  say "passed in $((SECONDS - start)) s"
  exit 0
fi

# ---- The GPU run.
if compgen -G ".whl/*.whl" >/dev/null; then
  # As ../shared/gpu/README.md says; skipped when a warm machine already has them.
  if [[ ! -d /tmp/site/bitsandbytes ]]; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
      || { echo "gpu_check: installing the carried wheels from .whl/ failed" >&2; exit 2; }
  fi
  export PYTHONPATH="$PWD/src:/tmp/site${PYTHONPATH#"$PWD/src"}"
fi
if [[ $rehearse == 1 ]]; then
  # CPU stand-ins for the GPU: the tests' tiny-shape bodies, and the bench at random:tiny.
  export LQ_GPU_CHECK_DEVICE=cpu
  bench_extra=(--device cpu --model random:tiny --seq 16 --threads 1)
  "$py" "$helper" preflight --dry-run --out "$work/env.json" || exit 2
else
  bench_extra=()
  "$py" "$helper" preflight --out "$work/env.json" || exit 2
fi
slug=$("$py" -c 'import json, sys; print(json.load(open(sys.argv[1]))["slug"])' "$work/env.json")
if [[ -n ${OUT:-} ]]; then logs=$OUT; else logs=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-logs.XXXXXX"); fi
if [[ -n $out_file ]]; then report_file=$out_file
elif [[ -n ${OUT:-} ]]; then report_file="$OUT/gpu-$slug.json"
elif [[ $rehearse == 1 ]]; then report_file="$logs/gpu-$slug.json"  # CPU figures: not for bench/results
else report_file="bench/results/gpu-$slug.json"
fi
mkdir -p "$logs" "$(dirname "$report_file")"
report_args=()

if [[ $want_tests == 1 ]]; then
  # Leave the bench its 2 minutes (two 8B workers, ~40 s each) when it runs too.
  reserve=$((want_bench == 1 ? 120 : 10))
  limit=$(($(left) - reserve))
  ((limit > 170)) && limit=170
  if ((limit < 30)); then
    echo "gpu_check: only $limit s left for the tests; raise --budget" >&2
    exit 2
  fi
  # tests/test_gpu.py stops each of its tests at LQ_GPU_TEST_TIMEOUT; pytest-timeout, where the image
  # has it, stops the others (the FSDP test runs first, and a hang there must not eat the whole part).
  if "$py" -c "import pytest_timeout" 2>/dev/null; then tests_cmd+=(--timeout 90); fi
  echo "gpu_check: tests (pytest -m gpu, at most $limit s, 60 s a test)"
  t0=$SECONDS
  set +e
  LQ_GPU_TEST_TIMEOUT=60 timeout -k 10 "$limit" "${tests_cmd[@]}" 2>&1 | tee "$logs/gpu-$slug-tests.log"
  tests_rc=${PIPESTATUS[0]}
  set -e
  report_args+=(--junit "$work/junit.xml" --tests-log "$logs/gpu-$slug-tests.log" --tests-rc "$tests_rc"
    --tests-seconds $((SECONDS - t0)))
fi

if [[ $want_bench == 1 ]]; then
  limit=$(($(left) - 10))
  if ((limit < 60)); then
    echo "gpu_check: only $limit s left for the bench; raise --budget" >&2
    report_args+=(--bench-rc 124 --bench-seconds 0 --bench-json "$work/none.json")
  else
    # Each worker builds the 8B model on the GPU (seconds), then 2 untimed and 3 timed steps.
    per_worker=$(((limit - 10) / 2))
    echo "gpu_check: bench (bench/run.py gpu --runs 1, at most $limit s, $per_worker s a side)"
    t0=$SECONDS
    set +e
    timeout -k 10 "$limit" "$py" bench/run.py gpu --runs 1 --steps 5 --warmup 2 --timeout "$per_worker" \
      --out "$work/bench.json" ${bench_extra[@]+"${bench_extra[@]}"} 2>&1 | tee "$logs/gpu-$slug-bench.log"
    bench_rc=${PIPESTATUS[0]}
    set -e
    report_args+=(--bench-json "$work/bench.json" --bench-rc "$bench_rc" --bench-seconds $((SECONDS - t0)))
  fi
fi

set +e
"$py" "$helper" report --env "$work/env.json" --out "$report_file" --commit "$commit" --date "$today" \
  --budget "$budget" --total-seconds $((SECONDS - start)) ${report_args[@]+"${report_args[@]}"}
rc=$?
set -e
echo "gpu_check: logs in $logs; $((SECONDS - start)) s in all"
exit $((rc == 0 ? 0 : 1))
