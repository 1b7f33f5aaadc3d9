"""The shmrate benchmark suite (issue 5).

Run ``python -m bench`` for the full comparison (about six minutes on two
cores) or ``python -m bench --quick`` for the few-second check CI runs. See
``bench/README.md`` for what each measure means.
"""
