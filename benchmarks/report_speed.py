"""How long `fer-study report` takes on a finished study, and how much of it is the Grad-CAM
appendix.

Builds the report of an existing study folder twice (without and with the Grad-CAM appendix) into a
temporary folder and prints ONE JSON line with both wall and CPU times, the Grad-CAM appendix's cost
per backbone (logged by study.report.gradcam_appendix), the study's size and the machine. Targets on
a 2-core CPU: well under a minute for the smoke study (scripts/demo.sh makes results/demo); the
appendix at most 60 s per backbone for MobileNetV2 at 96 px with >= 64 images in every metric (issue
14). On a shared machine compare the CPU seconds, not the wall times.

    python3 benchmarks/report_speed.py results/demo
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="a finished study folder, e.g. results/demo")
    parser.add_argument("--gradcam-per-class", type=int, default=2)
    parser.add_argument(
        "--n-faithfulness", type=int, default=128, help="faithfulness sample (images)"
    )
    args = parser.parse_args()

    import logging

    per_backbone = {}

    class Timings(
        logging.Handler
    ):  # study.report.gradcam_appendix logs "gradcam appendix NAME: W s wall, C s CPU"
        def emit(self, record):
            if record.getMessage().startswith("gradcam appendix "):
                name, wall, cpu = record.args
                per_backbone[name] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}

    logger = logging.getLogger("study.report.gradcam_appendix")
    logger.setLevel(logging.INFO)
    logger.addHandler(Timings())

    from fer.runtime.machine import machine_info
    from study.report import build_report, load_study

    study = load_study(args.study)
    timings = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, per_class in (
            ("without_gradcam_s", 0),
            ("with_gradcam_s", args.gradcam_per_class),
        ):
            start, cpu_start = time.perf_counter(), time.process_time()
            out = build_report(
                args.study,
                Path(tmp) / label,
                gradcam_per_class=per_class,
                n_faithfulness=args.n_faithfulness,
            )
            timings[label] = round(time.perf_counter() - start, 2)
            # CPU seconds of this process: comparable even on a machine shared with other jobs
            timings[label.replace("_s", "_cpu_s")] = round(time.process_time() - cpu_start, 2)
        html_mb = (out / "report.html").stat().st_size / 1e6
    print(
        json.dumps(
            {
                "benchmark": "report_speed",
                "study": str(args.study),
                "backbones": len(study.backbones),
                "tested_backbones": len(study.ok),
                "gradcam_per_class": args.gradcam_per_class,
                "n_faithfulness": args.n_faithfulness,
                **timings,
                "gradcam_per_backbone": per_backbone,
                "html_mb": round(html_mb, 2),
                "load_average_1min": round(os.getloadavg()[0], 2),
                "machine": machine_info(),
            }
        )
    )


if __name__ == "__main__":
    main()
