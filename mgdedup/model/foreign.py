"""Foreign checkpoints (torchvision, published MultiGrain) converted into one neutral form.

The neutral form is what the rest of mgdedup understands: a trunk state dict in our names whose
classifier applies to the raw GeM vector g, the GeM exponent, and optionally a whitening
Phi(x) = S (x - m) on x = l2n(g). The caller loads the file (torch.load(..., weights_only=True),
a checkpoint is untrusted input) and passes the object here; this module never unpickles.

Whitened MultiGrain checkpoints (written by the reference `scripts/whiten.py`) store neither the
original classifier nor a whitening of l2n(g); see `_convert_whitened` for what they store and
how it is inverted.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from torch import Tensor

from mgdedup.errors import MgdedupError

log = logging.getLogger(__name__)

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP, torch.compile
RESNET50_DIM = 2048
EXPECTED = ("expected a torchvision ResNet-50 state dict (conv1.weight ... fc.weight) or a "
            "MultiGrain checkpoint (model_state with features.*, pool.p, classifier.*)")


@dataclass
class ConvertedWeights:
    """A foreign checkpoint in mgdedup's terms."""

    trunk_name: str  # "resnet50"
    trunk_state: dict[str, Tensor]  # loads into ResNet50Trunk (strict); fc applies to raw g
    p: float  # GeM exponent the weights were trained (or whitened) with; 1.0 = average pooling
    whitening_mean: Tensor | None  # (D,)   Phi(x) = matrix @ (x - mean), x = l2n(g)
    whitening_matrix: Tensor | None  # (k, D)
    source: str  # "torchvision" | "multigrain"


def strip_wrapper_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop leading `module.` / `_orig_mod.` (in any order, any number) from every key."""
    stripped = {}
    for key, value in state.items():
        name = key
        while name.startswith(WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        stripped[name] = value
    return stripped


def _model_state(obj: object) -> dict[str, Tensor]:
    """The state dict inside a checkpoint object, prefixes stripped; tensors only."""
    if not isinstance(obj, dict):
        raise MgdedupError(f"unrecognised checkpoint: a {type(obj).__name__}; {EXPECTED}")
    state = obj
    for wrapper in ("model_state", "state_dict", "model"):
        if isinstance(obj.get(wrapper), dict):
            state = obj[wrapper]
            break
    if not state or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise MgdedupError(f"unrecognised checkpoint layout (not a dict of tensors); {EXPECTED}")
    return strip_wrapper_prefixes(state)


def convert_state_dict(obj: dict) -> ConvertedWeights:
    """Convert a torchvision ResNet-50 state dict or a (whitened) MultiGrain checkpoint."""
    state = _model_state(obj)
    if "conv1.weight" in state and "fc.weight" in state:
        return ConvertedWeights("resnet50", state, 1.0, None, None, "torchvision")
    if "features.conv1.weight" in state and "classifier.weight" in state:
        return _convert_multigrain(state)
    sample = ", ".join(list(state)[:3])
    raise MgdedupError(f"unrecognised checkpoint layout (keys {sample}, ...); {EXPECTED}")


def _convert_multigrain(state: dict[str, Tensor]) -> ConvertedWeights:
    """MultiGrain names -> torchvision names: features.X -> X, classifier -> fc."""
    if "pool.p" not in state:
        raise MgdedupError(f"MultiGrain checkpoint without pool.p; {EXPECTED}")
    p = float(state["pool.p"].reshape(-1)[0])
    if not math.isfinite(p) or p <= 0:
        raise MgdedupError(f"MultiGrain checkpoint has GeM exponent pool.p = {p}; expected > 0")
    trunk = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    known = ("features.", "pool.", "classifier.", "whitening.")
    ignored = [k for k in state if not k.startswith(known)]
    if ignored:
        log.warning("ignoring %d unknown MultiGrain keys, e.g. %s", len(ignored), ignored[0])

    weight = state["classifier.weight"]  # (C, D) or (C, D + 1) when whitened
    bias = state.get("classifier.bias")  # (C,)
    has_pca = "whitening.pca.pca_P" in state and "whitening.pca.pca_m" in state
    mean = matrix = None
    if weight.dim() == 2 and weight.shape[1] == RESNET50_DIM and not has_pca:
        if bias is None:
            raise MgdedupError("MultiGrain checkpoint without classifier.bias; expected a "
                               "1000x2048 classifier with its bias")
        fc_weight, fc_bias = weight, bias
    elif weight.dim() == 2 and weight.shape[1] == RESNET50_DIM + 1 and has_pca:
        fc_weight, fc_bias, mean, matrix = _convert_whitened(
            weight, bias, state["whitening.pca.pca_P"], state["whitening.pca.pca_m"])
    else:
        raise MgdedupError(
            f"MultiGrain classifier.weight of shape {tuple(weight.shape)} "
            f"{'with' if has_pca else 'without'} whitening.pca.*; expected 1000x2048 without "
            "whitening or 1000x2049 with whitening.pca.pca_P and pca_m")
    trunk["fc.weight"], trunk["fc.bias"] = fc_weight, fc_bias
    return ConvertedWeights("resnet50", trunk, p, mean, matrix, "multigrain")


def _convert_whitened(weight: Tensor, bias: Tensor | None, pca_p: Tensor, pca_m: Tensor,
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Undo the reference's whitening fold: (W', b', P, m) -> (W, b) on g, and S, mu on l2n(g).

    What the reference (multigrain/lib/multigrain.py, modules/functional.py, scripts/whiten.py)
    does, with D = 2048 and g the GeM vector:
      - `init_whitening` folds the bias into the weights, W~ = [W | b] (C, D+1), and makes the
        pooling append a constant channel: g~ = [g; 1] (D+1,).
      - the whitening applies to z = l2n(g~) = g~ / (||g~|| + 1e-6), *including* that channel:
        y = (z - m) @ P, with (m, P) from sklearn PCA(whiten=True) on z over the whitening
        images, P = components.T / sqrt(explained_variance), square (D+1, D+1).
      - `integrate_whitening` stores W' = W~ P^{-T} and b' = W~ m, so the classifier, applied
        to the whitened y, gives  W' y + b' = W~ P^{-T} P^T (z - m) + W~ m = W~ z
        = (W g + b) / (||[g; 1]|| + 1e-6).
    So the reference whitened logits are the original logits divided by a positive per-image
    scale: same ranking, softer softmax. A linear classifier on raw g cannot be that (it is not
    linear in g); we return the original one, W~ = W' P^T, i.e. W = W~[:, :D], b = W~[:, D],
    whose logits equal the reference ones times (||[g; 1]|| + 1e-6). b' = W~ m is a check.

    The reference whitening reads z, not x = l2n(g): z = [c x; d] with c = ||g|| / ||g~|| and
    d = 1 / ||g~||, so y depends on ||g|| as well as x and no affine map of x reproduces it.
    We return its value at the whitening set's mean norm: m[D] is the mean of d there, and
    c ~ sqrt(1 - d^2), so with d = m[D], c = sqrt(1 - m[D]^2):
        y ~ P[:D]^T (c x - m[:D]) = S (x - mu),  S = c P[:D]^T (k, D),  mu = m[:D] / c.
    Exact for an image whose norm is the mean one. With --no-include-last (P = diag(P0, 1),
    m[D] = 0) it is P0^T (x - m[:D]), off from the reference only by c = 1 - O(1/||g||^2) and
    the unwhitened extra coordinate d (whose all-zero row of S is dropped). Otherwise the
    whitened direction carrying d is frozen at its mean; refit with mgdedup's whitening for an
    exact one.
    """
    dim = weight.shape[1] - 1
    if pca_p.dim() != 2 or pca_p.shape != (dim + 1, dim + 1) or pca_m.shape != (dim + 1,):
        raise MgdedupError(f"whitening.pca.pca_P of shape {tuple(pca_p.shape)} and pca_m of "
                           f"shape {tuple(pca_m.shape)}; expected {dim + 1}x{dim + 1} and "
                           f"{dim + 1} (a full-rank PCA, as the reference's fold requires)")
    w_prime, big_p, m = weight.double(), pca_p.double(), pca_m.double()
    folded = w_prime @ big_p.T  # W~ = W' P^T, (C, D+1)
    if bias is not None:
        expected_bias = folded @ m  # b' = W~ m, (C,)
        error = (expected_bias - bias.double()).abs().max() / expected_bias.abs().max().clamp_min(1)
        if error > 1e-3:
            log.warning("whitened MultiGrain checkpoint: classifier.bias differs from the "
                        "reference fold by %.2g (relative); converting anyway", float(error))
    fc_weight = folded[:, :dim].float().contiguous()  # (C, D)
    fc_bias = folded[:, dim].float().contiguous()  # (C,)

    d_mean = float(m[dim])
    c = math.sqrt(max(1.0 - d_mean * d_mean, 1e-12))
    matrix = c * big_p[:dim].T  # (D+1, D) rows = whitened dims
    keep = matrix.abs().amax(dim=1) > 0  # drop the all-zero row of a --no-include-last fit
    matrix = matrix[keep].float().contiguous()  # (k, D)
    mean = (m[:dim] / c).float().contiguous()  # (D,)
    log.info("whitened MultiGrain checkpoint: classifier unfolded exactly; whitening of "
             "l2n([g, 1]) approximated on l2n(g) at the fitting set's mean norm (%d dims)",
             matrix.shape[0])
    return fc_weight, fc_bias, mean, matrix
