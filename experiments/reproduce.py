"""Every study in experiments/, from nothing (training included), one after another: `make reproduce`.

    OMP_NUM_THREADS=1 python experiments/reproduce.py [--root /tmp/hiresrun-reproduce] [--only pagoda simple]
    python experiments/reproduce.py --list          # the plan: each study's commands, nothing run

Each study is the list of commands its README gives, run through bash from the repository root with run folders
under --root; each study script writes its results.json and rewrites the tables of its README. The wall time of
each study goes to experiments/reproduce.json, so the README can say what a full reproduction took.
A study whose command fails is reported and the next one runs; the exit status is non-zero if any failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = Path(sys.executable)
H = PY.with_name("hiresrun")

MATRIX_N = 100                                                 # images per matrix pair (seeds 0..99)
SIMPLE_RUN = "study_300steps_bs16_n200/train-s32"             # the shifted 16 -> 32 fine-tune of simple/study.py
ST = "experiment=skiptuning/fid"             # skiptuning sweeps: conf/experiment/skiptuning/fid.yaml (n = 300)
ST_CHEAP = "experiment=skiptuning/digits16"  # 16 px, n = 300, digit metrics only


def studies(root: str) -> dict[str, list[str]]:
    """study folder -> its commands (bash), in the order they must run."""
    sc, st, mx = f"{root}/selfcascade", f"{root}/skiptuning", f"{root}/matrix"
    return {
        "selfcascade": [f"{PY} experiments/selfcascade/run.py --n 500 --steps 300 --out {sc}"],
        "skiptuning": [
            f"{H} sample -m sampler.num_steps=10 accelerator=skiptuning accelerator.rho=0.7,0.8,0.85,0.9,0.95,1.0 "
            f"data.resolution=32 sample.num_samples=300 {ST} hydra.sweep.dir={st}/ddim32_10",
            f"{H} sample -m sampler.num_steps=10 accelerator=skiptuning accelerator.rho=0.7,0.9,0.95,0.99,1.0 "
            f"data.resolution=16 sample.num_samples=300 {ST} hydra.sweep.dir={st}/ddim16_10",
            f"{H} sample -m sampler.num_steps=10,20,40 accelerator.rho=0.8,0.9,0.95,0.99,1.0 {ST_CHEAP} "
            f"hydra.sweep.dir={st}/digits16",
            f"{H} sample -m sampler=dpmsolver sampler.num_steps=10 accelerator.rho=0.8,0.9,0.95,0.99,1.0 {ST_CHEAP} "
            f"hydra.sweep.dir={st}/dpm16",
            f"{H} sample -m sampler.num_steps=10 accelerator.mode=linear accelerator.rho_bottom=0.6,0.7,0.8,0.9 "
            f"accelerator.rho_top=1.0 {ST_CHEAP} hydra.sweep.dir={st}/linear16",
            f"{H} sample -m sampler.num_steps=10 accelerator.rho=0.8 "
            f"accelerator.time_schedule=none,increasing,decreasing {ST_CHEAP} hydra.sweep.dir={st}/time16",
            f"{H} sample -m sampler.num_steps=10 accelerator=skiptuning accelerator.rho=0.9,0.95,0.98,1.0 "
            f"data.resolution=16 sample.num_samples=1000 {ST} hydra.sweep.dir={st}/n1000/ddim16_10",
            f"{H} sample -m +method=selfcascade method.upsampler=resblock "
            f"ckpt_path={sc}/tuned_resblock_300_steps-train sampler.num_steps=10 accelerator=skiptuning "
            f"accelerator.rho=0.9,0.95,1.0 data.resolution=32 sample.num_samples=1000 {ST} "
            f"hydra.sweep.dir={st}/n1000/sc32_10",
            f"{PY} experiments/skiptuning/report.py {st}/{{ddim32_10,ddim16_10,digits16,dpm16,linear16,time16}} "
            f"{st}/n1000/{{ddim16_10,sc32_10}} --out experiments/skiptuning"],
        "adaptive": [f"{PY} experiments/adaptive/run.py --threads 1"],
        "simple": [f"{PY} experiments/simple/run.py --steps 500 --n 500 --out {root}/simple",
                   f"{PY} experiments/simple/study.py --out {root}/simple"],
        "classguidance": [f"{PY} experiments/classguidance/run.py --n 500 --steps 1500 --init {init} "
                          f"--out {root}/classguidance" for init in ("normal", "zero")],
        "tinysd": [f"{PY} experiments/tinysd/run.py {study} --n 500 --out {root}/tinysd"
                   for study in ("guidance", "selfcascade", "adaptive", "unet")],
        "flow": [f"{PY} experiments/flow/run.py {study} --out {root}/flow"
                 for study in ("guidance", "highres", "caches")],
        "accelerators": [f"{PY} experiments/accelerators/run.py --out {root}/accelerators"],
        "pagoda": [f"{PY} experiments/pagoda/run.py --n 500 --out {root}/pagoda",
                   f"{PY} experiments/pagoda/run.py --sweep --out {root}/pagoda"],
        # every method x accelerator pair at 32 px on the checkpoints the studies above trained (linked, not
        # retrained), n = MATRIX_N; `hiresrun report` writes the table and plots into experiments/matrix/
        "matrix": [f"mkdir -p {mx} && ln -sfn {sc}/tuned_resblock_300_steps-train {mx}/selfcascade && "
                   f"ln -sfn {sc}/finetune_all_weights_1500_steps-train {mx}/finetune && "
                   f"ln -sfn {root}/simple/{SIMPLE_RUN} {mx}/simple && "
                   f"ln -sfn {root}/pagoda/G16/train {mx}/pagoda-base && ln -sfn {root}/pagoda/G32/train {mx}/pagoda",
                   f"{H} sample -m experiment=matrix metrics=default matrix.checkpoints={mx} "
                   f"sample.num_samples={MATRIX_N} +method=none,upsample,finetune,selfcascade,pagoda,simple "
                   f"+accelerator=none,adaptive,skiptuning,freeu hydra.sweep.dir={mx}/sweep",
                   f"{H} report {mx}/sweep --out experiments/matrix"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="/tmp/hiresrun-reproduce", help="run folders of every study go under here")
    p.add_argument("--only", nargs="+", help="study folders to run (default: all)")
    p.add_argument("--list", action="store_true", help="print the plan and exit")
    args = p.parse_args()
    plan = studies(args.root)
    unknown = set(args.only or ()) - set(plan)
    if unknown:
        print(f"reproduce: no study named {', '.join(sorted(unknown))}; choose from {', '.join(plan)}",
              file=sys.stderr)
        return 2
    chosen = {k: v for k, v in plan.items() if not args.only or k in args.only}
    if args.list:
        for name, commands in chosen.items():
            print(f"# {name}\n" + "\n".join(commands))
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    log_path = HERE / "reproduce.json"
    log = json.loads(log_path.read_text()) if log_path.is_file() else {}
    failed = []
    for name, commands in chosen.items():
        start, status = time.perf_counter(), "ok"
        for cmd in commands:
            print(f"$ {cmd}", flush=True)
            if subprocess.run(["bash", "-c", cmd], cwd=REPO, env=env).returncode:
                status = f"failed: {cmd}"
                failed.append(name)
                break
        log[name] = {"status": status, "wall_s": round(time.perf_counter() - start), "root": args.root,
                     "date": time.strftime("%Y-%m-%d"), "cpu_count": os.cpu_count()}
        log_path.write_text(json.dumps(log, indent=2) + "\n")
        print(f"reproduce: {name} {status} in {log[name]['wall_s']} s", flush=True)
    if failed:
        print(f"reproduce: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
