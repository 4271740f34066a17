"""The released DASR weights (G.pth and P.pth) as a `DASR`, read with weights_only=True and checked key by key.

The files must be regular files written by torch.save (a zip archive); anything else is a one-line DASRError.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from dasr_model.checkpoints import load_torch_file, refuse_non_finite
from dasr_model.config import DASRConfig
from dasr_model.errors import DASRError
from dasr_model.model import DASR


def _state_dict_from(source: dict[str, Tensor] | str | Path, prefer_ema: bool) -> dict[str, Tensor]:
    from_file = isinstance(source, (str, Path))
    # a regular file and a torch zip, else a one-line DASRError
    data = load_torch_file(Path(source), "weights file") if from_file else source
    where = source if from_file else "weights"
    if not isinstance(data, dict):
        raise DASRError(f"{where}: a release file must hold a dict")
    key = "params_ema" if prefer_ema and "params_ema" in data else "params" if "params" in data else None
    state = data if key is None else data[key]  # without either: already a bare state dict
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(t, Tensor) for k, t in state.items()):
        raise DASRError(f"{where}: {key or 'the file'} must be a dict of named tensors (a release state dict)")
    return state


def load_release_weights(g: dict[str, Tensor] | str | Path, p: dict[str, Tensor] | str | Path, *,
                         prefer_ema: bool = True) -> DASR:
    """A DASR holding the release's weights: G and P as state dicts or paths to the release `.pth` files.

    Files are read with `torch.load(weights_only=True)`; the G file's `params_ema` is used when present
    (`prefer_ema`), else `params`. Keys and shapes must match the release layout exactly, and the weights be
    finite (else DASRError).
    """
    g_state = _state_dict_from(g, prefer_ema)
    p_state = _state_dict_from(p, prefer_ema=False)
    for name, source, state in (("G", g, g_state), ("P", p, p_state)):
        where = f"{source}: refused: its" if isinstance(source, (str, Path)) else f"release {name} weights:"
        refuse_non_finite(state, f"{where} weight")
    first = g_state.get("conv_first.weight")
    if not isinstance(first, Tensor) or first.dim() != 5:
        raise DASRError("release G weights: no expert conv_first.weight (K, 64, 3, 3, 3); is this DASR's G file?")
    model = DASR(DASRConfig(num_experts=int(first.shape[0]), mixing="linear", predictor_input="lr"))  # as released
    for name, module, state in (("G", model.generator, g_state), ("P", model.predictor, p_state)):
        try:
            module.load_state_dict(state, strict=True)
        except (RuntimeError, TypeError, AttributeError) as exc:
            detail = " ".join(line.strip() for line in str(exc).splitlines()[1:2]) or str(exc)
            raise DASRError(f"release {name} weights do not fit the released layout ({detail[:200]})") from None
    return model
