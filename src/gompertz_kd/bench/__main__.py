"""``python -m gompertz_kd.bench``."""

from gompertz_kd.bench.cli import main

if __name__ == "__main__":
    main()
