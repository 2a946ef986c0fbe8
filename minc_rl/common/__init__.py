"""minc_rl.common: the ground floor every room stands on. Value checks that raise one-line ValueErrors (checks),
atomic file writes (io), the one-line usage errors and override checks of every entry point (cli), and the
ownership of a run directory (run_dir: lock, fresh-run check, resume). Imports nothing else of minc_rl."""
