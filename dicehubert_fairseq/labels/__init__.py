"""K-means labels for DiceHuBERT: teacher-layer (or MFCC) features, streamed k-means, label files.

* :mod:`.features` -- :class:`~.features.TeacherFeatureReader` (layer ``L`` of a HuBERT-family
  checkpoint, batched) and :class:`~.features.MfccFeatureReader` (Kaldi MFCC in torch);
* :mod:`.kmeans` -- the algorithm: :class:`~.kmeans.StreamingKMeans` (fairseq learn_kmeans'
  MiniBatchKMeans, fed by a stream in bounded memory), hard/soft assignment;
* :mod:`.fit` -- ``fit``: k-means on (a sample of) a manifest, the joblib model files;
* :mod:`.dump` -- ``dump``/``merge``: resumable, sharded hard/soft label dumping, shard merging;
* :mod:`.quality` -- ``quality``: phone purity, cluster purity and PNMI against phone alignments;
* :mod:`.cli` -- the ``dicehubert-labels`` command (``python -m dicehubert_fairseq.labels``), its
  options generated from the config dataclasses of the modules above.
"""
