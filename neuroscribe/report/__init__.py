"""The report stage: the robustness report of a job (``report.{html,md,json}``, ``curve.png``).

The description exports and gallery are written by the describe stage (:mod:`neuroscribe.describe.exports`,
:mod:`neuroscribe.describe.gallery`)."""
