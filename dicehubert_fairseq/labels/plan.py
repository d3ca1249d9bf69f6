"""Plan, then run: every option of a ``dicehubert-labels`` command checked and resolved once.

:func:`make_plan` checks every option (one line each, before anything is loaded), reads the
manifest, loads the k-means model, opens the feature reader, checks the audio headers, and
resolves what the options leave open: the inference batch, the k-means sample and pool, the
model's mode, the soft labels' temperature, the shard's block grid and the fingerprint of a
resumable dump. It returns a frozen :class:`LabelPlan`, which ``fit`` (:func:`.fit.fit`),
``dump`` (:func:`.dump.dump`), ``run`` (:func:`.onepass.run`) and ``merge``
(:func:`.blocks.merge`) take, and nothing beside it.

Why shards, resumed runs and ``run`` write the bytes of one uninterrupted ``dump``: the plan's
:class:`~.blocks.BlockGrid`.
"""

import hashlib
import logging
import os
from dataclasses import dataclass, replace
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from ..data.files import read_manifest
from ..data.preflight import check_audio, require_valid
from ..errors import InputError
from ..feature_cache import FeatureCache
from .blocks import Block, BlockGrid, MergeConfig, MergePlan, check_shards, shard_range, split_tag
from .config import Corpus, FeatureConfig, make_reader, max_batch_samples
from .dump import DumpConfig, check_dump_config
from .features import FeatureReader, FeatureSource
from .fit import (POOL_FRAMES_PER_CLUSTER, FitConfig, check_fit_config, fit_settings, fitted_normalized, load_kmeans,
                  sample_rows)
from .kmeans import pool_frames

logger = logging.getLogger(__name__)

#: The commands a plan is made for.
COMMANDS = ("fit", "dump", "run", "merge")


@dataclass(frozen=True)
class KMeansModel:
    """A k-means model as ``dump`` uses it: ``(K, D)`` float32 centroids, our metadata, its mode."""

    path: str
    centers: np.ndarray
    meta: Dict[str, object]
    normalize: bool

    @property
    def n_clusters(self) -> int:
        return int(self.centers.shape[0])


@dataclass(frozen=True)
class FitPlan:
    """A resolved fit: the sample's rows in the order k-means reads them, its frames, the pool.

    Attributes:
        done: (``run``) the model file was written by a fit of these inputs and settings.
    """

    cfg: FitConfig
    rows: Tuple[int, ...]
    frames: int
    pool_size: int
    two_pass: bool
    settings: Dict[str, object]
    done: bool = False


@dataclass(frozen=True)
class DumpPlan:
    """A resolved dump: its files, its block grid and, once the model is known, the model, the
    temperature ``T`` and the fingerprint a resumed run must match."""

    cfg: DumpConfig
    tag: str
    label_path: str
    grid: BlockGrid
    model: Optional[KMeansModel] = None
    temperature: Optional[float] = None
    fingerprint: Optional[Dict[str, object]] = None

    @property
    def parts(self) -> str:
        """Where the finished blocks are kept until the final files are assembled."""
        return self.label_path + ".parts"

    def block_path(self, block: Block) -> str:
        return os.path.join(self.parts, f"block_{block.index:06d}.npz")


@dataclass(frozen=True)
class LabelPlan:
    """Everything a command needs, checked and resolved (see the module docstring).

    Attributes:
        command: ``fit``, ``dump``, ``run`` or ``merge``.
        split: the split the files are named after.
        progress: tqdm bars.
        source: the features (manifest, open reader, batch; ``run``: the sample's cache).
        fit / dump / merge: the parts of the command.
    """

    command: str
    split: str
    progress: bool = True
    source: Optional[FeatureSource] = None
    fit: Optional[FitPlan] = None
    dump: Optional[DumpPlan] = None
    merge: Optional[MergePlan] = None

    def with_model(self) -> "LabelPlan":
        """This plan with its dump resolved against the model file ``dump.cfg.km`` (``run``: once it is fitted).

        Raises:
            InputError: everything :func:`make_plan` refuses about a model for ``dump``.
        """
        model, temperature = _load_model(self.dump.cfg)
        _check_features(model, self.source.reader)
        return replace(self, dump=_resolved(self.dump, model, temperature, self.source))


def make_plan(command: str, corpus: Optional[Corpus] = None, features: Optional[FeatureConfig] = None,
              fit: Optional[FitConfig] = None, dump: Optional[DumpConfig] = None, merge: Optional[MergeConfig] = None,
              *, reader: Optional[FeatureReader] = None, progress: bool = True) -> LabelPlan:
    """Check every option of ``command`` and resolve them into a plan.

    Everything cheap (options, manifest, shard, k-means model) is checked before the teacher is
    loaded; with ``corpus.check_headers``, the audio headers of the rows read too, before any
    feature is computed.

    Args:
        command: ``fit`` (``corpus``, ``features``, ``fit``), ``dump`` (``corpus``, ``features``,
            ``dump``), ``run`` (all three and ``fit``; ``dump.km`` must be ``fit.out``, one shard)
            or ``merge`` (``merge``).
        corpus / features / fit / dump / merge: the options.
        reader: an open reader to read the features with instead of ``features``'s (e.g. one
            serving stored features).
        progress: tqdm bars.

    Returns:
        the frozen :class:`LabelPlan`; for ``run``, :meth:`LabelPlan.with_model` resolves the dump
        once the model is fitted.

    Raises:
        InputError: bad options, manifest, shard, model, audio or teacher; a feature dimension
            other than the model's; ``dump.normalize`` set and different from the model's mode;
            K larger than the frames sampled; for ``merge``, see :func:`~.blocks.check_shards`.
    """
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}, expected one of {COMMANDS}")
    if command == "merge":
        return LabelPlan(command, merge.split, progress, merge=check_shards(merge))
    _check_options(command, fit, dump)
    manifest = read_manifest(corpus.manifest_path)
    shard = shard_range(len(manifest), dump.nshard, dump.rank, manifest.path) if dump is not None else None
    model, temperature = _load_model(dump) if command == "dump" else (None, None)
    if fit is not None:  # created now: an output that cannot be written fails before the teacher loads
        os.makedirs(os.path.dirname(os.path.abspath(fit.out)), exist_ok=True)
    reader = reader or make_reader(features)
    if model is not None:
        _check_features(model, reader)
    sample = sample_rows(len(manifest), fit.percent, fit.seed) if fit is not None else None
    if corpus.check_headers:  # the rows the command reads (run: every row)
        rows = sorted(int(r) for r in sample) if command == "fit" else list(range(*shard)) if command == "dump" else None
        require_valid(check_audio(manifest, reader.sample_rate, headers=True, rows=rows), manifest.path)
    source = FeatureSource(manifest, reader, max_batch_samples(features or FeatureConfig(), reader))
    fit_plan = _fit_part(fit, sample, source, run=command == "run") if fit is not None else None
    if command == "run" and source.alone and not fit_plan.done:  # the sample's features, kept for the labels
        source = replace(source, cache=FeatureCache(fit_plan.pool_size, reader.dim))
    dump_plan = None
    if dump is not None:
        grid = BlockGrid(len(manifest), shard[0], shard[1], dump.block_size, source.alone)
        tag = split_tag(corpus.split, dump.nshard, dump.rank)
        dump_plan = DumpPlan(dump, tag, os.path.join(dump.label_dir, f"{tag}.{dump.name}"), grid)
        if model is not None:
            dump_plan = _resolved(dump_plan, model, temperature, source)
    return LabelPlan(command, corpus.split, progress, source, fit_plan, dump_plan)


def _check_options(command: str, fit: Optional[FitConfig], dump: Optional[DumpConfig]) -> None:
    """The options' values alone (one line each)."""
    if command == "run":
        if dump.nshard != 1 or dump.rank != 0:
            raise InputError(["dicehubert-labels run writes one process's labels; for shards, 'fit' once, then "
                              "'dump --nshard N --rank R' and 'merge'"])
        if os.path.abspath(dump.km) != os.path.abspath(fit.out):
            raise InputError([f"run: the labels must use the model it fits ({fit.out}), not {dump.km}"])
    if fit is not None:
        check_fit_config(fit)
    if dump is not None:
        check_dump_config(dump, fit.n_clusters if fit is not None else None)


def _fit_part(cfg: FitConfig, sample: Sequence[int], source: FeatureSource, run: bool) -> FitPlan:
    """The sample's frames and the pool; warns where a streamed fit is measured to lose."""
    frames = sum(source.num_frames(int(i)) for i in sample)
    K, manifest = cfg.n_clusters, source.manifest
    if frames < K:
        raise InputError([f"{manifest.path}: K={K} clusters but the {len(sample)} utterance(s) sampled "
                          f"({cfg.percent:g} of {len(manifest)}) have only {frames} frames at "
                          f"{source.reader.frame_rate:g} Hz (use fewer clusters or a larger --percent)"])
    pool = pool_frames(K, cfg.batch_size, cfg.pool_size)
    if frames > pool and pool < POOL_FRAMES_PER_CLUSTER * K:
        logger.warning(f"--pool-size {pool} holds {pool / K:.1f} frames per cluster for K={K}, "
                       f"fewer than {POOL_FRAMES_PER_CLUSTER}: the streamed fit of {frames} frames will be further "
                       f"from an in-memory fit (measured +3.6 % at 7 per cluster, about +1 % at 28; see "
                       f"benchmarks/README.md); give --pool-size {POOL_FRAMES_PER_CLUSTER * K} or more")
    settings = fit_settings(cfg, source.batch_samples)
    done = run and _finished_fit(cfg.out, manifest.path, source.reader.description, settings)
    return FitPlan(cfg, tuple(int(r) for r in sample), frames, pool, frames > pool, settings, done)


def _finished_fit(path: str, manifest_path: str, description: Dict[str, object], settings: Dict[str, object]) -> bool:
    """Whether ``path`` holds a model fitted with these inputs and settings (``run``'s resume)."""
    if not os.path.isfile(path) or os.path.getmtime(path) < os.path.getmtime(manifest_path):
        return False
    try:
        _, meta = load_kmeans(path)
    except InputError:
        return False
    return (meta.get("settings") == settings and meta.get("features") == description
            and meta.get("manifest") == os.path.abspath(manifest_path))


def _load_model(cfg: DumpConfig) -> Tuple[KMeansModel, float]:
    """The model of ``cfg.km`` checked against the dump's options, and the temperature ``T`` resolved."""
    km, meta = load_kmeans(cfg.km)
    normalize = fitted_normalized(meta)
    if cfg.normalize is not None and bool(cfg.normalize) != normalize:
        raise InputError([
            f"{cfg.km}: fitted on raw features "
            f"(no 'fit --normalize'{'' if meta else '; fairseq learn_kmeans model'}), "
            f"but --normalize asks for L2-normalised ones: fit a model with 'dicehubert-labels fit --normalize'"
            if cfg.normalize else
            f"{cfg.km}: fitted on L2-normalised features (fit --normalize), but raw features were asked for"])
    temperature = cfg.temperature
    if cfg.temperature_gap is not None:
        gap = ((meta.get("distances") or {}).get("gap") or {}).get("p50")
        if not gap or not gap > 0:
            raise InputError([f"{cfg.km}: no median gap stored (a model not written by this version's "
                              f"'dicehubert-labels fit', or K = 1): give --temperature instead of --temperature-gap"])
        temperature = float(cfg.temperature_gap) * float(gap)
        logger.info(f"--temperature-gap {cfg.temperature_gap:g} x median gap {gap:.6g}: T = {temperature:.6g}")
    centers = np.asarray(km.cluster_centers_, dtype=np.float32)
    check_dump_config(cfg, len(centers), cfg.km)
    return KMeansModel(cfg.km, centers, meta, normalize), float(temperature)


def _check_features(model: KMeansModel, reader: FeatureReader) -> None:
    """The features must have the centroids' dimension; other features than the fit's get a warning."""
    D = model.centers.shape[1]
    if D != reader.dim:
        raise InputError([f"{model.path}: centroids have dimension {D}, but the features have {reader.dim} "
                          f"({reader.description.get('type')}); was the model fitted on other features?"])
    fitted = model.meta.get("features") or {}
    for key in ("type", "layer"):
        if key in fitted and fitted[key] != reader.description.get(key):
            logger.warning(f"{model.path}: fitted on {key}={fitted[key]}, dumping {key}={reader.description.get(key)}")


def _resolved(d: DumpPlan, model: KMeansModel, temperature: float, source: FeatureSource) -> DumpPlan:
    """``d`` with its model, temperature and fingerprint: what a resumed run must have been started with."""
    soft, description = d.cfg.soft, source.reader.description
    fingerprint = {
        "version": 3, "manifest": _file_id(source.manifest.path), "km": _file_id(model.path),
        "features": dict(description), "soft": bool(soft), "temperature": temperature if soft else None,
        "top_k": int(d.cfg.top_k) if soft else None, "normalize": bool(model.normalize),
        "nshard": d.cfg.nshard, "rank": d.cfg.rank, "block_size": d.cfg.block_size,
        "max_batch_samples": source.batch_samples,
    }
    if description.get("checkpoint"):
        fingerprint["checkpoint_file"] = _file_id(description["checkpoint"], content=False)
    if "dtype" in description:
        fingerprint["dtype"] = description["dtype"]
    return replace(d, model=model, temperature=temperature, fingerprint=fingerprint)


def _file_id(path: str, content: bool = True) -> str:
    """A file's SHA-1 (``content``), or its path, size and modification time."""
    if content:
        h = hashlib.sha1()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    st = os.stat(path)
    return f"{os.path.abspath(path)}:{st.st_size}:{int(st.st_mtime)}"
