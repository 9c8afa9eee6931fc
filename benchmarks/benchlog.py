"""The benchmarks' log: every line is printed as it comes and kept for the results file."""


class Log(list):
    """`log(text)` prints `text` at once and appends it; the log is the list of its lines."""

    def __call__(self, text: str) -> None:
        print(text, flush=True)
        self.append(text)
