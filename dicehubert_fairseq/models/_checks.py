"""Build-time checks of a student's config: settings fairseq would accept and then get wrong."""

from ..errors import InputError
from ..frames import conv_layers, frame_stride


def check_label_rate(label_rate: float, sample_rate: int, conv_feature_layers: str) -> None:
    """Labels at ``label_rate`` must map to the model's frames by an integer ratio, either way.

    fairseq's ``forward_targets`` picks label ``floor(t * ratio)`` for frame ``t`` with
    ``ratio = label_rate / frame_rate``: 2 (HuBERT iteration 1: 100 Hz MFCC labels, 50 Hz frames)
    subsamples every other label and 1/2 repeats every label twice, but e.g. 1.5 silently drops
    every third label and skews the alignment.  ``label_rate <= 0`` (sequence labels) is not checked.

    Raises:
        InputError: the ratio is neither an integer nor the inverse of one.
    """
    if label_rate <= 0:
        return
    stride = frame_stride(conv_layers(conv_feature_layers))
    frame_rate = sample_rate / stride
    ratio = label_rate / frame_rate
    ok = any(r >= 1 and abs(r - round(r)) < 1e-6 for r in (ratio, 1.0 / ratio))
    if not ok:
        raise InputError([
            f"task.label_rate={label_rate:g} Hz does not fit the student's frame rate {frame_rate:g} Hz "
            f"(model.conv_feature_layers strides multiply to {stride} samples at task.sample_rate="
            f"{sample_rate}): label_rate / frame_rate = {ratio:.4g}, expected an integer or 1/integer "
            f"(e.g. 50 Hz k-means labels or 100 Hz MFCC labels with a 50 Hz student)"
        ])


def check_mask_options(cfg) -> None:
    """Span-mask settings that fairseq's ``compute_mask_indices`` cannot draw, refused at build time.

    This fairseq (0.12.3's sources, like fairseq's main branch) draws spans with numpy's
    ``Generator``: its ``uniform`` span lengths call ``Generator.randint``, which does not exist,
    and its non-overlapping spans also use ``np.int``, gone since numpy 1.24; the first training
    batch would stop with an ``AttributeError`` (fairseq 0.12.2 drew them from ``np.random``).

    Raises:
        InputError: one line per setting.
    """
    problems = []
    for kind in ("mask", "mask_channel"):
        if getattr(cfg, f"{kind}_prob", 0) <= 0:
            continue
        if str(getattr(cfg, f"{kind}_selection", "static")) == "uniform":
            problems.append(f"model.{kind}_selection=uniform: this fairseq's compute_mask_indices cannot draw "
                            f"uniform span lengths (it calls numpy's Generator.randint, which does not exist); "
                            f"expected static, normal or poisson")
        if getattr(cfg, f"no_{kind}_overlap", False):
            problems.append(f"model.no_{kind}_overlap=true: this fairseq's compute_mask_indices cannot draw "
                            f"non-overlapping spans (it calls numpy's Generator.randint and np.int, which do not "
                            f"exist); expected false")
    if problems:
        raise InputError(problems)
