"""The experiment core every technique calls (``core``), its grid of cells (``plan``), units of
work and executors (``executor``) and saved progress (``checkpoint``)."""
