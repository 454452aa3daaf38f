"""FlashHead-compile: a retrieval LM head as a torch.library op, compiled and exported.

Main entry points: build_assets (offline clustering), swap_head (install the head on a model
instance), compile_model (head + torch.compile), generate (compiled static-cache decode loop),
always_scored_ids (the end-of-turn / eos ids FlashHead scores at every step).
Command line: `python -m fh_compile build-assets ...` (fh_compile.cli).  Progress is logged (stages,
seconds, folders) at level INFO: `logging.basicConfig(level=logging.INFO)` shows it.
"""

import warnings

from fh_compile.always import always_scored_ids
from fh_compile.assets import AssetError, FlashHeadAssets, weight_fingerprint
from fh_compile.build_assets import build_assets
from fh_compile.compile import CompileInfo, compile_model, uncompile_model
from fh_compile.generate import GenerateResult, generate
from fh_compile.head import FlashHeadConfig, FlashHeadLMHead, restore_dense_head, swap_head
from fh_compile.loading import ModelLoadError, load_model
from fh_compile.sampling import SamplingConfig

# `python -m fh_compile.build_assets` (kept working for old scripts) runs a module this package has
# already imported for its build_assets function, and runpy warns about that.  The module only
# defines functions and hands over to fh_compile.cli, so the second copy is harmless.
warnings.filterwarnings("ignore", message=r"'fh_compile\.build_assets' found in sys\.modules",
                        category=RuntimeWarning)

__all__ = ["AssetError", "FlashHeadAssets", "weight_fingerprint", "build_assets",
           "FlashHeadConfig", "FlashHeadLMHead", "restore_dense_head", "swap_head",
           "SamplingConfig", "compile_model", "uncompile_model", "CompileInfo", "generate", "GenerateResult",
           "ModelLoadError", "load_model", "always_scored_ids"]
