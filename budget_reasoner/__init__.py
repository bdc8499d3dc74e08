"""budget-reasoner: turn a small open model into a narrow-domain reasoner on one GPU (or the CPU).

The API, one function per stage: `recipe.quickstart`, `generate.generate`, `train.sft.sft`,
`train.dpo.dpo`, `train.distill.cache_teacher_topk` / `distill`, `eval.run.evaluate`;
presets through `config.load_preset`; the fused kernels in `kernels`.
"""

import logging

# bitsandbytes warns at import on CPUs with AVX512-BF16 that it cannot fetch an optional kernel from
# the hub (which needs network and the `kernels` package); its own fallback works, so keep it quiet.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"
