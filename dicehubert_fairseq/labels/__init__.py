"""K-means labels for DiceHuBERT: teacher-layer (or MFCC) features, streamed k-means, label files.

Plan, then run: :func:`~.plan.make_plan` checks and resolves every option of a command into a
frozen :class:`~.plan.LabelPlan`, which the command's function runs.

* :mod:`.config` -- what is read: the corpus, :class:`~.config.FeatureConfig` and the reader it names;
* :mod:`.features` -- the readers' interface and :class:`~.features.FeatureSource` (rows read in
  length-sorted batches, optionally through a feature cache);
* :mod:`.teacher` -- :class:`~.teacher.TeacherFeatureReader` (layer ``L`` of a HuBERT-family
  checkpoint, batched); :mod:`.mfcc` -- :class:`~.mfcc.MfccFeatureReader` (Kaldi MFCC in torch);
* :mod:`.kmeans` -- the algorithm: :class:`~.kmeans.StreamingKMeans` (fairseq learn_kmeans'
  fit on a pool, then our own online mini-batch step), hard/soft assignment;
* :mod:`.plan` -- :func:`~.plan.make_plan`;
* :mod:`.fit` -- ``fit``: k-means on (a sample of) a manifest, the joblib model files;
* :mod:`.dump` -- ``dump``: hard/soft labels of a split or shard;
* :mod:`.blocks` -- the block grid (why shards, resumed runs and ``run`` write the same bytes),
  block writing, resume, assembly of the final files, ``merge`` of shards;
* :mod:`.onepass` -- ``run``: fit + dump in one process, the k-means sample's features reused;
* :mod:`.quality` -- ``quality``: phone purity, cluster purity and PNMI against phone alignments;
* :mod:`.cli` -- the ``dicehubert-labels`` command (``python -m dicehubert_fairseq.labels``), its
  options generated from the config dataclasses of the modules above.
"""
