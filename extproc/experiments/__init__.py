"""Experiments: the paper's and new ones, our policy against baselines, in virtual time or live.

`tokenpools experiment NAME --policy all --mode sim --out DIR`. See docs/experiments.md.
"""
