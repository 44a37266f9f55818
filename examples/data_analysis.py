"""Upload a CSV, analyse it with pandas, train a model, and bring a chart back."""

import base64
import csv
import io
import random

from bilik import Sandbox

# A small data set: two features, and a label that mostly follows their sum.
random.seed(7)
rows = []
for _ in range(300):
    a, b = random.uniform(0, 10), random.uniform(0, 10)
    rows.append({"a": round(a, 2), "b": round(b, 2), "label": int(a + b + random.gauss(0, 1) > 10)})
table = io.StringIO()
writer = csv.DictWriter(table, fieldnames=["a", "b", "label"])
writer.writeheader()
writer.writerows(rows)

with Sandbox.create() as sandbox:
    sandbox.files.write("/home/user/data.csv", table.getvalue())
    summary = sandbox.run_code(
        "import pandas as pd\ndf = pd.read_csv('/home/user/data.csv')\ndf.describe()"
    )
    print(summary.text)
    trained = sandbox.run_code(
        """
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

train, test = train_test_split(df, test_size=0.3, random_state=0)
model = LogisticRegression().fit(train[["a", "b"]], train["label"])
accuracy = model.score(test[["a", "b"]], test["label"])
print(f"accuracy: {accuracy:.2f}")
"""
    )
    print(trained.logs.stdout[0], end="")
    if trained.error:
        raise SystemExit(f"{trained.error.name}: {trained.error.value}")
    charted = sandbox.run_code(
        """
import matplotlib.pyplot as plt

plt.scatter(df["a"], df["b"], c=df["label"])
plt.title("label by a and b")
plt.savefig("/home/user/chart.png")
plt.show()
"""
    )
    # (the image saved comes back too, as on E2B: the figure shown is the last result)
    chart = charted.results[-1]
    print("chart:", chart.chart.type if chart.chart else "image only")
    saved = sandbox.files.read("/home/user/chart.png", format="bytes")
    with open("chart.png", "wb") as out:
        out.write(saved)
    assert base64.b64decode(chart.png)[:8] == bytes(saved[:8]) == b"\x89PNG\r\n\x1a\n"
    print(f"downloaded chart.png, {len(saved)} bytes")
