"""K-means labels for DiceHuBERT: teacher-layer (or MFCC) features, streamed k-means, label files.

* :mod:`.features` -- :class:`~.features.TeacherFeatureReader` (layer ``L`` of a HuBERT-family
  checkpoint, batched) and :class:`~.features.MfccFeatureReader` (Kaldi MFCC in torch);
* :mod:`.kmeans` -- :class:`~.kmeans.StreamingKMeans` (fairseq learn_kmeans' MiniBatchKMeans,
  fed by a stream in bounded memory), hard/soft assignment, joblib model files;
* :mod:`.dump` -- resumable, sharded hard/soft label dumping, shard merging;
* :mod:`.cli` -- the ``dicehubert-labels`` command (``python -m dicehubert_fairseq.labels``).
"""
