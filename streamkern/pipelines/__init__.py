"""Reference pipelines that call streamkern's ops (DESIGN.md §5)."""
