"""Tests of fastdl.nn."""
