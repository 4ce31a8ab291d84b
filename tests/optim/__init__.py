"""Tests of fastdl.optim and the fused optimizer ops (a package so that the tests share helpers.py)."""
