"""Coverage-guided fuzz targets (atheris) and their harnesses; see tests/test_fuzz_*.py."""
