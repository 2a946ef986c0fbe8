"""`python -m minc_rl.report <sweep or run dirs> --baseline aux=none`: a study's tables, IQM, probability of
improvement and curves from the run directories of `python -m minc_rl.train` (the body: minc_rl.runs.report)."""

from minc_rl.runs.report import main

if __name__ == "__main__":
    main()
