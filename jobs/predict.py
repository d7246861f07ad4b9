"""Ray job entry point of `lardo-ray predict` (same flags; see --help)."""

from _entry import run

if __name__ == "__main__":
    run()
