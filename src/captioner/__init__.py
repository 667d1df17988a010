"""captioner: image captioning with CNN encoders and LSTM decoders.

from captioner import Captioner
print(Captioner.from_pretrained().caption("photo.jpg").caption)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Captioner", "__version__"]

if TYPE_CHECKING:
    from captioner.model import Captioner


def __getattr__(name: str) -> Any:
    # Lazy: `import captioner` (and `captioner --help`) must not pay for importing torch.
    if name == "Captioner":
        from captioner.model import Captioner

        return Captioner
    raise AttributeError(name)
