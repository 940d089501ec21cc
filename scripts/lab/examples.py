"""Record the lab's first-page example: one SpeCa run of the bundled tiny FLUX with its comparison, written to
assets/examples/ (the image, the full run's image, the trace with `meta["run"]` and the comparison's numbers).

    python -m scripts.lab.examples
"""

from __future__ import annotations

import json
import os

import app
from lab import methods as LM
from lab import models as M

OUT = os.path.join(M.ROOT, "assets", "examples")


def main() -> None:
    lab = app.Lab(every_s=3600)
    *_, final = lab.generate(model=M.TINY, prompt=app.EXAMPLES[0], seed=0, method=LM.SPECA, compare=True)
    out = dict(zip(app.OUTPUTS, final))
    trace, extra = out["trace"], lab.last_extra
    os.makedirs(OUT, exist_ok=True)
    out["image"].save(os.path.join(OUT, "speca.png"), optimize=True)
    out["full_image"].save(os.path.join(OUT, "full.png"), optimize=True)
    trace.to_json(os.path.join(OUT, "speca_trace.json"))
    keep = {k: extra[k] for k in ("psnr", "ssim", "measured_speedup", "pairs", "full_ms") if k in extra}
    with open(os.path.join(OUT, "speca_comparison.json"), "w") as f:
        json.dump(keep, f, indent=1)
    print("wrote", sorted(os.listdir(OUT)))


if __name__ == "__main__":
    main()
