"""Benchmark evaluation: retrieval/classification metrics and loaders of standard datasets.

`metrics` holds the scores of the paper's protocols (Holidays mAP, UKB N-S score, Copydays
mAP, ImageNet top-k) and of pair-level copy detection (micro-AP, precision/recall at a
threshold); `datasets` turns dataset folders into paths and ground truth. Neither runs a model.
"""
