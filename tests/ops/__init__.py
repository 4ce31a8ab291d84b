"""Tests of fastdl.ops."""
