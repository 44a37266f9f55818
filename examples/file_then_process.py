"""Write a program into the sandbox, run it, and watch its output as it comes."""

from bilik import Sandbox

PROGRAM = """
import time
for step in range(1, 4):
    print(f"step {step} of 3", flush=True)
    time.sleep(0.5)
print("done")
"""

sandbox = Sandbox.create()
try:
    sandbox.files.write("/home/user/job.py", PROGRAM)
    result = sandbox.commands.run(
        "python3 /home/user/job.py",
        on_stdout=lambda line: print("sandbox:", line, end=""),
    )
    print("exit code", result.exit_code)
finally:
    sandbox.kill()
