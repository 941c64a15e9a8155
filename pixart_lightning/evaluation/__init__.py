"""Images from a trained model, and their scores: the sample generator, FID and the shapes-world alignment.

``generate`` samples images; ``alignment`` scores prompt-following on the shapes world. FID is ``fid`` (the
protocol) over ``captions`` (the pinned caption set), ``extractors`` (resize and features), ``feature_stats``
(moments, Fréchet distance, cached reference statistics) and ``data_source`` (what is read from a data source).
"""
