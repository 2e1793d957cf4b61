"""The application around the library: declarative configs, resumable experiment directories,
the demo and the ``actpatch`` command line."""
