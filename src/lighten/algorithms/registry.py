"""Weight quantization algorithms by name: what each collects from calibration, and how it quantizes.

Each algorithm is an Algorithm declared next to its maths (rtn.py, gptq.py, awq.py, imatrix.py). ALGORITHMS
says where; this module imports none of them, so that recipes can check an algorithm's name without torch.
Options other than the defaults make another Algorithm, which calibrate_model takes as well:

    in_order = dataclasses.replace(
        GPTQ, quantize_weight=lambda w, fmt, hessian: gptq_quantize_layer(w, hessian, fmt, act_order=False)
    )
"""

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from lighten.errors import LightenError
from lighten.formats.spec import IMPORTANCE_WEIGHTED

# What the block loop (lighten.algorithms.calibrate) gathers for an algorithm from each block's inputs.
NOTHING = "nothing"
HESSIAN = "hessian"  # per planned linear: H = 2 XᵀX / n of its inputs X
SAMPLES = "samples"  # per norm group: evenly spaced rows of the input its readers share
IMPORTANCE = "importance"  # per planned linear: mean x² of each input column (llama.cpp's imatrix)

ALGORITHMS = {
    "rtn": "lighten.algorithms.rtn:RTN",
    "mse": "lighten.algorithms.rtn:MSE",
    "gptq": "lighten.algorithms.gptq:GPTQ",
    "awq": "lighten.algorithms.awq:AWQ",
    "imatrix": "lighten.algorithms.imatrix:IMATRIX",
}
# Calibration an algorithm reads unless a recipe says otherwise (lighten.recipes.Calibration otherwise).
# imatrix: llama-imatrix's chunks of 512, 4 of them rather than its ~100: on smollm2-135m they keep 97 % of
# the KL gain over RTN that 16 chunks give, at a quarter of the forward passes (README, Calibration).
# gptq, awq: 128 windows of 512, the scale of the published runs; with 4 windows GPTQ fitted the
# calibration text and lost to RTN on held-out text (README, Calibration).
DEFAULT_CALIBRATION = {
    "imatrix": {"tokens": 2048, "context": 512},
    "gptq": {"tokens": 128 * 512, "context": 512},
    "awq": {"tokens": 128 * 512, "context": 512},
}


@dataclass(frozen=True)
class Algorithm:
    name: str
    collects: str  # NOTHING, HESSIAN, SAMPLES or IMPORTANCE
    # (w [out, in] fp32, format, this weight's HESSIAN or IMPORTANCE, or None) -> QuantizedTensor
    quantize_weight: Callable
    # (norm group, its SAMPLES, plan): rescales the group in place before its weights are quantized (AWQ)
    rescale_group: Callable | None = None

    @property
    def needs_data(self) -> bool:
        """Whether it reads calibration text; the others run no forward pass at all."""
        return self.collects != NOTHING


def default_algorithm(spec: str) -> str:
    """The algorithm for a canonical spec when none is named: imatrix for the GGUF types whose llama.cpp
    quantizer weighs importance (llama-quantize --imatrix), rtn for everything else."""
    return "imatrix" if spec in IMPORTANCE_WEIGHTED else "rtn"


def get_algorithm(name: str) -> Algorithm:
    """The algorithm registered as `name`; LightenError listing the known ones."""
    if name not in ALGORITHMS:
        raise LightenError(f"unknown algorithm {name!r}: use one of {', '.join(ALGORITHMS)}")
    module, attribute = ALGORITHMS[name].split(":")
    return getattr(importlib.import_module(module), attribute)
