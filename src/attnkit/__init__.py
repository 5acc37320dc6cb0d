"""attnkit: the attention mechanism, complete, fast and visible.

>>> import torch, attnkit
>>> q = k = v = torch.randn(2, 4, 16, 32)          # (B, H, L, D)
>>> out = attnkit.attention(q, k, v, mask=attnkit.masks.causal())
>>> out.shape
torch.Size([2, 4, 16, 32])
"""

from attnkit import masks, score_mods
from attnkit._mkl_warmup import warm_vml
from attnkit._types import DispatchDecision, UnsupportedError
from attnkit.block_mask import BlockMask
from attnkit.functional import attention, attention_weights, dispatch
from attnkit.functional import backends as _backend_names
from attnkit.masks import Mask
from attnkit.varlen import varlen_attention

__version__ = "0.1.0"

warm_vml()  # before any threaded first call of MKL's vector math (pytorch/pytorch#188792)

# ``attnkit.backends`` is also the name of the sub-package that holds the kernels. The
# public API (DESIGN §3) is the function, so it is bound after every sub-package import, under
# the package's name: ``import attnkit.backends.tiled as t`` looks ``tiled`` up on what
# ``attnkit.backends`` holds, then in sys.modules by that object's ``__name__`` + ".tiled".
backends = _backend_names
backends.__name__ = "attnkit.backends"

__all__ = [
    "BlockMask",
    "DispatchDecision",
    "Mask",
    "UnsupportedError",
    "__version__",
    "attention",
    "attention_weights",
    "backends",
    "dispatch",
    "masks",
    "score_mods",
    "varlen_attention",
]
