"""Prefect orchestration of the DVC pipeline (see ``flows.pipeline``).

Kept import-free on purpose: ``import flows`` must not pull in Prefect or DVC. Stages are run only through
``dvc repro -s <stage>`` subprocesses; nothing here imports stage code.
"""
