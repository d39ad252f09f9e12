"""The bottom floor: how bytes and tables come in and go out.

Storage (local, s3://), sources and formats, robust decoding, preprocessing, label readers, result tables
(feature cache, pseudo-labels, scores), the image pass every image stage shares, the driver-side path
checks and demo data. Imports only :mod:`cskd_ray.config` and itself.
"""
