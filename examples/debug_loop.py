"""An agent's debug loop: run the code, read the error, fix, run again."""

from bilik import Sandbox

# What a model might write on its first, second and third try.
ATTEMPTS = [
    "numbers = [3, 1, 2]\nprint(sorted(numbrs))",
    "numbers = [3, 1, 2]\nprint(sorted(numbers)[3])",
    "numbers = [3, 1, 2]\nprint(sorted(numbers))",
]


def next_attempt(previous_errors: list[str]) -> str:
    """Stands in for asking a model to fix the code, given the errors so far."""
    return ATTEMPTS[len(previous_errors)]


with Sandbox.create() as sandbox:
    errors: list[str] = []
    while True:
        code = next_attempt(errors)
        execution = sandbox.run_code(code)
        if execution.error is None:
            print("worked after", len(errors), "fixes:", "".join(execution.logs.stdout), end="")
            break
        print(f"attempt {len(errors) + 1} failed: {execution.error.name}: {execution.error.value}")
        errors.append(f"{execution.error.name}: {execution.error.value}")
