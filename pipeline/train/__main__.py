"""``python -m pipeline.train`` / ``torchrun -m pipeline.train``: one training process
(:func:`pipeline.train.worker.main`; the flags are :func:`pipeline.train.job.add_arguments`)."""

from pipeline.train.worker import main

if __name__ == "__main__":
    main()
