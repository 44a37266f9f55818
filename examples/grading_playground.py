"""Grade students' solutions: each runs in its own sandbox, against the same tests,
with a time limit, so a bad submission cannot hurt the grader or the others."""

from concurrent.futures import ThreadPoolExecutor

from bilik import CommandExitException, Sandbox, TimeoutException

TESTS = """
from solution import fizzbuzz

assert fizzbuzz(3) == "Fizz"
assert fizzbuzz(5) == "Buzz"
assert fizzbuzz(15) == "FizzBuzz"
assert fizzbuzz(7) == "7"
print("all tests passed")
"""

SUBMISSIONS = {
    "ada": (
        "def fizzbuzz(n):\n    return 'Fizz' * (n % 3 == 0) + 'Buzz' * (n % 5 == 0) or str(n)\n"
    ),
    "bob": "def fizzbuzz(n):\n    return 'Fizz' if n % 3 == 0 else str(n)\n",
    "eve": "import os\ndef fizzbuzz(n):\n    while True:\n        pass\n",
}


def grade(student: str, code: str) -> tuple[str, str]:
    with Sandbox.create("base", timeout=120, allow_internet_access=False) as sandbox:
        sandbox.files.write("/home/user/solution.py", code)
        sandbox.files.write("/home/user/test_solution.py", TESTS)
        try:
            result = sandbox.commands.run("python3 test_solution.py", timeout=5)
        except CommandExitException as failed:
            return student, "fail: " + failed.stderr.strip().splitlines()[-1]
        except TimeoutException:
            return student, "fail: took too long"
        return student, "pass: " + result.stdout.strip()


with ThreadPoolExecutor(max_workers=3) as pool:
    for student, verdict in pool.map(lambda item: grade(*item), SUBMISSIONS.items()):
        print(f"{student}: {verdict}")
