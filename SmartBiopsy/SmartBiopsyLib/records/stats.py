"""Heterogeneity and imaging-pathology statistics for multiregional biopsy studies.

Pure numpy/scipy, no ``slicer``. Every result is a dataclass with ``to_dict()`` and carries the number of
observations actually used and a ``method`` string naming the exact procedure, so a report can state it.

Conventions
- Inputs are 1-D sequences of numbers (lists, tuples, numpy arrays). Non-numeric entries, infinities and
  too few observations raise :class:`InputDataError`. Missing values (NaN) raise too unless the caller
  passes ``omit_missing=True``; then incomplete observations (pairs, for paired functions) are dropped and
  ``n`` reports what remained.
- Units are those of the inputs (ADC in 1e-6 mm^2/s, FF/EF and Ki-67 in percent, ...); statistics that are
  unitless (rho, AUC, ICC, p) say so.
- Intervals are two-sided at ``confidence`` (default 0.95).
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import numpy as np
from scipy import stats as _st

from SmartBiopsyCoreLib.errors import InputDataError

logger = logging.getLogger(__name__)

#: numpy quantile method name -> Hyndman & Fan (1996) sample-quantile type.
QUANTILE_METHODS = {
    "inverted_cdf": 1,
    "averaged_inverted_cdf": 2,
    "closest_observation": 3,
    "interpolated_inverted_cdf": 4,
    "hazen": 5,
    "weibull": 6,
    "linear": 7,
    "median_unbiased": 8,
    "normal_unbiased": 9,
}


def _clean(d):
    """Recursively turn numpy scalars/arrays and non-finite floats into JSON-friendly values (NaN -> None)."""
    if isinstance(d, dict):
        return {k: _clean(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_clean(v) for v in d]
    if isinstance(d, np.ndarray):
        return _clean(d.tolist())
    if isinstance(d, np.generic):
        d = d.item()
    if isinstance(d, float) and not math.isfinite(d):
        return None
    return d


class _Result:
    def to_dict(self) -> dict:
        return _clean(asdict(self))


# ----------------------------------------------------------------------------------------------- input checks

def _as_array(values, name: str) -> np.ndarray:
    """1-D float array from ``values``; raises InputDataError for non-numeric, ragged or infinite input."""
    if values is None:
        raise InputDataError(f"{name} is missing; pass a list of numbers.")
    if isinstance(values, (str, bytes)):
        raise InputDataError(f"{name} is text ({values!r}), not a list of numbers; pass the numeric values.")
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        raise InputDataError(
            f"{name} contains non-numeric entries; check the column for text such as 'n/a' or units typed into cells."
        ) from None
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise InputDataError(f"{name} must be a flat list of numbers, got an array of shape {arr.shape}.")
    if np.isinf(arr).any():
        raise InputDataError(f"{name} contains infinite values; check the source data for division by zero.")
    return arr


def _one_sample(values, name: str, min_n: int, omit_missing: bool) -> np.ndarray:
    arr = _as_array(values, name)
    nan = np.isnan(arr)
    if nan.any():
        if not omit_missing:
            raise InputDataError(
                f"{name} has {int(nan.sum())} missing value(s); fill them in or ask for missing values to be omitted."
            )
        arr = arr[~nan]
    if arr.size < min_n:
        raise InputDataError(f"{name} has {arr.size} usable value(s); at least {min_n} are needed for this statistic.")
    return arr


def _paired(x, y, names: tuple[str, str], min_n: int, omit_missing: bool) -> tuple[np.ndarray, np.ndarray]:
    a = _as_array(x, names[0])
    b = _as_array(y, names[1])
    if a.shape != b.shape:
        raise InputDataError(
            f"{names[0]} has {a.size} values but {names[1]} has {b.size}; paired data need one value of each per observation."
        )
    nan = np.isnan(a) | np.isnan(b)
    if nan.any():
        if not omit_missing:
            raise InputDataError(
                f"{int(nan.sum())} pair(s) of {names[0]}/{names[1]} have a missing value; fill them in or ask for incomplete pairs to be omitted."
            )
        a, b = a[~nan], b[~nan]
    if a.size < min_n:
        raise InputDataError(
            f"only {a.size} complete pair(s) of {names[0]}/{names[1]}; at least {min_n} are needed for this statistic."
        )
    return a, b


def _check_confidence(confidence: float) -> float:
    try:
        c = float(confidence)
    except (TypeError, ValueError):
        raise InputDataError(f"confidence level {confidence!r} is not a number; use e.g. 0.95.") from None
    if not 0.0 < c < 1.0:
        raise InputDataError(f"confidence level {confidence!r} must lie between 0 and 1 (e.g. 0.95, not 95).")
    return c


# ----------------------------------------------------------------------------------------------- descriptive

@dataclass
class MedianIQR(_Result):
    """Median and inter-quartile range (units of the input)."""

    median: float
    q1: float
    q3: float
    iqr: float
    minimum: float
    maximum: float
    n: int
    method: str


def median_iqr(values, method: str = "linear", omit_missing: bool = False) -> MedianIQR:
    """Median, first and third quartile (and IQR = q3 - q1) with an explicitly named quantile definition.

    ``method`` is a numpy quantile method; the default ``"linear"`` is Hyndman & Fan type 7 (R's default,
    Excel QUARTILE.INC); ``"weibull"`` is type 6 (SPSS, Minitab, Excel QUARTILE.EXC). The median does not
    depend on the method for types 2 and 5-9 (mean of the two middle values when n is even).
    """
    if method not in QUANTILE_METHODS:
        raise InputDataError(f"unknown quantile method {method!r}; use one of {', '.join(QUANTILE_METHODS)}.")
    arr = _one_sample(values, "values", 1, omit_missing)
    q1, med, q3 = np.quantile(arr, [0.25, 0.5, 0.75], method=method)
    return MedianIQR(
        median=float(med), q1=float(q1), q3=float(q3), iqr=float(q3 - q1),
        minimum=float(arr.min()), maximum=float(arr.max()), n=int(arr.size),
        method=f"numpy.quantile method '{method}' (Hyndman & Fan type {QUANTILE_METHODS[method]})",
    )


@dataclass
class ParticipantSummary(_Result):
    """Per-participant mean and range (max - min over biopsy sites) of each variable.

    ``mean[var][i]``, ``range[var][i]`` and ``n_sites[var][i]`` refer to ``participants[i]``; units are those
    of the variable. The range is NaN (None in JSON) when a participant has fewer than two sites with a value,
    the mean is NaN when it has none.
    """

    participants: list
    variables: list
    n_sites: dict = field(default_factory=dict)
    mean: dict = field(default_factory=dict)
    range: dict = field(default_factory=dict)
    method: str = "mean over sites; range = max - min over sites with a value (needs >= 2 sites)"

    def rows(self) -> list[dict]:
        """One dict per participant: participant, n_sites_<var>, <var>_mean, <var>_range (NaN stays NaN)."""
        out = []
        for i, p in enumerate(self.participants):
            row = {"participant": p}
            for v in self.variables:
                row[f"{v}_n_sites"] = int(self.n_sites[v][i])
                row[f"{v}_mean"] = float(self.mean[v][i])
                row[f"{v}_range"] = float(self.range[v][i])
            out.append(row)
        return out


def per_participant_summary(participant_ids: Sequence, values: Mapping[str, Sequence]) -> ParticipantSummary:
    """Mean and range (max - min) over sites of every variable, per participant (vectorised group-by).

    ``participant_ids`` has one entry per site (biopsy core); ``values`` maps a variable name (e.g. ``adc``,
    ``ki67_percent``) to one number per site, NaN where not measured. Participants are returned sorted.
    """
    if participant_ids is None or len(participant_ids) == 0:
        raise InputDataError("no biopsy sites given; the cohort table is empty.")
    ids = np.asarray([str(p).strip() for p in participant_ids])
    if (ids == "").any():
        raise InputDataError(f"{int((ids == '').sum())} site(s) have no participant ID; fill in the participant column.")
    if not values:
        raise InputDataError("no variables given; the cohort table needs at least one map or pathology column.")
    participants, codes = np.unique(ids, return_inverse=True)
    n_p = participants.size
    summary = ParticipantSummary(participants=participants.tolist(), variables=list(values))
    for name, column in values.items():
        arr = _as_array(column, f"column '{name}'")
        if arr.size != ids.size:
            raise InputDataError(
                f"column '{name}' has {arr.size} values for {ids.size} sites; every site needs one entry (blank if missing)."
            )
        ok = ~np.isnan(arr)
        c, v = codes[ok], arr[ok]
        count = np.bincount(c, minlength=n_p)
        total = np.bincount(c, weights=v, minlength=n_p)
        hi = np.full(n_p, -np.inf)
        lo = np.full(n_p, np.inf)
        np.maximum.at(hi, c, v)
        np.minimum.at(lo, c, v)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        rng = np.where(count >= 2, hi - lo, np.nan)
        summary.n_sites[name] = count
        summary.mean[name] = mean
        summary.range[name] = rng
    return summary


# ----------------------------------------------------------------------------------------------- correlation

@dataclass
class CorrelationResult(_Result):
    """Correlation coefficient (unitless) with its confidence interval and two-sided p-value."""

    rho: float
    ci_low: float
    ci_high: float
    confidence: float
    p_value: float
    n: int
    method: str


def fisher_z_ci(rho: float, n: int, confidence: float = 0.95, se: str = "fisher") -> tuple[float, float]:
    """Confidence interval of a correlation coefficient by the Fisher z transform.

    z = atanh(rho), interval z -+ q * SE back-transformed with tanh, q the normal quantile. ``se="fisher"``
    uses SE = 1/sqrt(n - 3) (the usual choice in clinical papers); ``se="bonett_wright"`` uses the Spearman-specific
    SE = sqrt((1 + rho^2/2)/(n - 3)) (Bonett & Wright 2000). Needs n >= 4.
    """
    confidence = _check_confidence(confidence)
    try:
        rho = float(rho)
        n_int = int(n)
    except (TypeError, ValueError):
        raise InputDataError(f"correlation {rho!r} and sample size {n!r} must be numbers.") from None
    if n_int != n or n_int < 4:
        raise InputDataError(f"sample size {n!r} is too small for a Fisher-z interval; at least 4 observations are needed.")
    if not -1.0 <= rho <= 1.0 or math.isnan(rho):
        raise InputDataError(f"correlation {rho!r} is outside [-1, 1]; check that a coefficient, not a p-value or percent, was passed.")
    if se == "fisher":
        s = 1.0 / math.sqrt(n_int - 3)
    elif se == "bonett_wright":
        s = math.sqrt((1.0 + rho * rho / 2.0) / (n_int - 3))
    else:
        raise InputDataError(f"unknown standard error {se!r}; use 'fisher' or 'bonett_wright'.")
    if abs(rho) == 1.0:
        return rho, rho
    q = _st.norm.ppf(0.5 + confidence / 2.0)
    z = math.atanh(rho)
    return math.tanh(z - q * s), math.tanh(z + q * s)


def spearman(x, y, confidence: float = 0.95, se: str = "fisher", omit_missing: bool = False) -> CorrelationResult:
    """Spearman rank correlation with a Fisher-z confidence interval.

    rho and the p-value come from ``scipy.stats.spearmanr`` (ties get average ranks; p from the t
    distribution with n - 2 df); the interval from :func:`fisher_z_ci`. Needs n >= 4 complete pairs.
    """
    a, b = _paired(x, y, ("x", "y"), 4, omit_missing)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        raise InputDataError("one of the two variables has the same value at every observation; a correlation is undefined.")
    res = _st.spearmanr(a, b)
    rho = float(res.statistic)
    lo, hi = fisher_z_ci(rho, a.size, confidence, se)
    se_text = "1/sqrt(n-3)" if se == "fisher" else "sqrt((1+rho^2/2)/(n-3)) (Bonett-Wright)"
    return CorrelationResult(
        rho=rho, ci_low=lo, ci_high=hi, confidence=confidence, p_value=float(res.pvalue), n=int(a.size),
        method=f"Spearman rank correlation (scipy.stats.spearmanr, average ranks for ties, t-approximation p); "
               f"{confidence:.0%} CI by Fisher z with SE = {se_text}",
    )


# ----------------------------------------------------------------------------------------------- tests

@dataclass
class TestResult(_Result):
    """A hypothesis test: statistic, two-sided p-value, sample sizes, optional effect/CI (units of the input)."""

    statistic: float
    p_value: float
    n: list
    method: str
    df: float = float("nan")
    estimate: float = float("nan")
    ci_low: float = float("nan")
    ci_high: float = float("nan")

    __test__ = False  # not a pytest test class


def shapiro_wilk(values, omit_missing: bool = False) -> TestResult:
    """Shapiro-Wilk test of normality (scipy.stats.shapiro, Royston's algorithm); needs 3 <= n.

    ``statistic`` is W; a small p-value is evidence against normality.
    """
    arr = _one_sample(values, "values", 3, omit_missing)
    if np.ptp(arr) == 0:
        raise InputDataError("all values are identical; normality cannot be tested.")
    res = _st.shapiro(arr)
    return TestResult(statistic=float(res.statistic), p_value=float(res.pvalue), n=[int(arr.size)],
                      method="Shapiro-Wilk W (scipy.stats.shapiro, Royston 1995 approximation)")


def t_test(a, b, paired: bool = False, equal_var: bool = False, confidence: float = 0.95,
           omit_missing: bool = False) -> TestResult:
    """Two-sided t-test of a vs b.

    ``paired=True``: paired t-test on a - b (``scipy.stats.ttest_rel``), needs >= 2 complete pairs.
    ``paired=False``: independent samples, Welch's unequal-variance test by default (``equal_var=True`` for
    Student's pooled test) via ``scipy.stats.ttest_ind``, each group >= 2 values. ``estimate`` is the mean
    difference a - b with its confidence interval.
    """
    confidence = _check_confidence(confidence)
    if paired:
        x, y = _paired(a, b, ("a", "b"), 2, omit_missing)
        d = x - y
        if np.ptp(d) == 0:
            raise InputDataError("every paired difference is identical; the paired t statistic is undefined.")
        res = _st.ttest_rel(x, y)
        n = [int(x.size)]
        method = "paired t-test on a - b (scipy.stats.ttest_rel), two-sided"
        est = float(d.mean())
    else:
        x = _one_sample(a, "a", 2, omit_missing)
        y = _one_sample(b, "b", 2, omit_missing)
        if np.ptp(x) == 0 and np.ptp(y) == 0:
            raise InputDataError("both groups have zero variance; the t statistic is undefined.")
        res = _st.ttest_ind(x, y, equal_var=equal_var)
        n = [int(x.size), int(y.size)]
        method = ("independent two-sample t-test, " + ("Student pooled variance" if equal_var else "Welch unequal variances")
                  + " (scipy.stats.ttest_ind), two-sided")
        est = float(x.mean() - y.mean())
    ci = res.confidence_interval(confidence_level=confidence)
    return TestResult(statistic=float(res.statistic), p_value=float(res.pvalue), n=n, method=method,
                      df=float(res.df), estimate=est, ci_low=float(ci.low), ci_high=float(ci.high))


def mann_whitney(a, b, omit_missing: bool = False) -> TestResult:
    """Two-sided Mann-Whitney U test (scipy.stats.mannwhitneyu, exact p for small samples without ties,
    else normal approximation with tie and continuity correction). ``statistic`` is U of a; ``estimate`` is
    U / (n_a n_b), the probability that a value of a exceeds one of b (ties count one half)."""
    x = _one_sample(a, "a", 1, omit_missing)
    y = _one_sample(b, "b", 1, omit_missing)
    if np.ptp(np.concatenate([x, y])) == 0:
        raise InputDataError("all values in both groups are identical; the rank test is undefined.")
    res = _st.mannwhitneyu(x, y, alternative="two-sided", method="auto")
    return TestResult(statistic=float(res.statistic), p_value=float(res.pvalue), n=[int(x.size), int(y.size)],
                      method="Mann-Whitney U, two-sided (scipy.stats.mannwhitneyu, method='auto')",
                      estimate=float(res.statistic) / (x.size * y.size))


# ----------------------------------------------------------------------------------------------- ROC

@dataclass
class RocResult(_Result):
    """ROC analysis of a continuous score against a binary reference (AUC, sensitivity, specificity unitless).

    The Youden cut-off is in the units of the score; the decision rule is stated in ``rule``.
    """

    auc: float
    ci_low: float
    ci_high: float
    se: float
    confidence: float
    n_positive: int
    n_negative: int
    cutoff: float
    sensitivity: float
    specificity: float
    youden_index: float
    rule: str
    method: str
    fpr: list = field(default_factory=list)
    tpr: list = field(default_factory=list)
    thresholds: list = field(default_factory=list)


def _labels(labels, n: int) -> np.ndarray:
    if isinstance(labels, (str, bytes)):
        raise InputDataError("labels must be a list of 0/1 (or True/False), not text.")
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.size != n:
        raise InputDataError(f"there are {lab.size} labels for {n} scores; give one 0/1 label per observation.")
    try:
        f = lab.astype(float)
    except (TypeError, ValueError):
        raise InputDataError("labels must be 0 (negative) or 1 (positive); found non-numeric entries.") from None
    if not np.isin(f, (0.0, 1.0)).all():
        bad = np.unique(f[~np.isin(f, (0.0, 1.0))])[:5]
        raise InputDataError(f"labels must be 0 (negative) or 1 (positive); found {bad.tolist()}.")
    return f.astype(bool)


def delong_auc_variance(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """AUC and its DeLong et al. (1988) variance, via midranks (Sun & Xu 2014), vectorised."""
    m, n = pos.size, neg.size
    tx = _st.rankdata(pos)
    ty = _st.rankdata(neg)
    tz = _st.rankdata(np.concatenate([pos, neg]))
    v10 = (tz[:m] - tx) / n          # placement of each positive among negatives
    v01 = 1.0 - (tz[m:] - ty) / m    # placement of each negative among positives
    auc = float(v10.mean())
    s10 = float(np.var(v10, ddof=1)) if m > 1 else 0.0
    s01 = float(np.var(v01, ddof=1)) if n > 1 else 0.0
    return auc, s10 / m + s01 / n


def hanley_mcneil_se(auc: float, n_pos: int, n_neg: int) -> float:
    """Standard error of an AUC by Hanley & McNeil (1982), exponential approximation."""
    q1 = auc / (2.0 - auc)
    q2 = 2.0 * auc * auc / (1.0 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)) / (n_pos * n_neg)
    return math.sqrt(max(var, 0.0))


def roc_analysis(scores, labels, positive_if: str = "higher", confidence: float = 0.95,
                 ci_method: str = "delong") -> RocResult:
    """ROC AUC with a confidence interval and the Youden-optimal cut-off.

    ``labels``: 1 = positive (e.g. FNCLCC grade 3, high Ki-67), 0 = negative. ``positive_if="higher"`` calls an
    observation positive when score >= cut-off; ``"lower"`` when score <= cut-off (e.g. low ADC for high
    cellularity). AUC = P(score_pos ranks beyond score_neg) with ties counted one half (= U / (n1 n0)).
    CI: Wald interval AUC -+ q * SE, clipped to [0, 1], with SE from DeLong et al. 1988 (``ci_method="delong"``,
    default) or Hanley & McNeil 1982 (``"hanley_mcneil"``). Youden: the candidate cut-offs are the observed
    score values; J = sensitivity + specificity - 1 is maximised; ties go to the first cut-off in the order of
    the rule (the most conservative, i.e. highest for "higher").
    """
    confidence = _check_confidence(confidence)
    s = _one_sample(scores, "scores", 2, omit_missing=False)
    lab = _labels(labels, s.size)
    if positive_if not in ("higher", "lower"):
        raise InputDataError(f"positive_if must be 'higher' or 'lower', got {positive_if!r}.")
    if ci_method not in ("delong", "hanley_mcneil"):
        raise InputDataError(f"unknown AUC interval method {ci_method!r}; use 'delong' or 'hanley_mcneil'.")
    n_pos, n_neg = int(lab.sum()), int((~lab).sum())
    if n_pos == 0 or n_neg == 0:
        raise InputDataError(
            f"ROC analysis needs both positive and negative cases; got {n_pos} positive and {n_neg} negative."
        )
    sgn = 1.0 if positive_if == "higher" else -1.0
    t = sgn * s  # in t, positive means larger
    pos, neg = t[lab], t[~lab]
    auc, var = delong_auc_variance(pos, neg)
    se = math.sqrt(max(var, 0.0)) if ci_method == "delong" else hanley_mcneil_se(auc, n_pos, n_neg)
    q = _st.norm.ppf(0.5 + confidence / 2.0)
    lo, hi = max(0.0, auc - q * se), min(1.0, auc + q * se)

    # ROC curve: thresholds are the observed values in decreasing t; positive if t >= thr.
    thr = np.unique(t)[::-1]
    pos_sorted = np.sort(pos)
    neg_sorted = np.sort(neg)
    tp = n_pos - np.searchsorted(pos_sorted, thr, side="left")
    fp = n_neg - np.searchsorted(neg_sorted, thr, side="left")
    tpr = tp / n_pos
    fpr = fp / n_neg
    j = tpr + (1.0 - fpr) - 1.0
    best = int(np.argmax(j))
    cutoff = float(sgn * thr[best])
    rule = f"positive if score {'>=' if sgn > 0 else '<='} {cutoff:g}"
    name = "DeLong et al. 1988 (midrank algorithm)" if ci_method == "delong" else "Hanley & McNeil 1982"
    return RocResult(
        auc=auc, ci_low=lo, ci_high=hi, se=se, confidence=confidence, n_positive=n_pos, n_negative=n_neg,
        cutoff=cutoff, sensitivity=float(tpr[best]), specificity=float(1.0 - fpr[best]), youden_index=float(j[best]),
        rule=rule,
        method=f"empirical ROC (ties count 1/2); {confidence:.0%} CI: AUC -+ z*SE clipped to [0,1], SE by {name}; "
               f"Youden J = sensitivity + specificity - 1 maximised over observed values",
        fpr=np.concatenate([[0.0], fpr]).tolist(), tpr=np.concatenate([[0.0], tpr]).tolist(),
        thresholds=(sgn * thr).tolist(),
    )


# ----------------------------------------------------------------------------------------------- ICC

@dataclass
class ICCEstimate(_Result):
    form: str
    description: str
    icc: float
    ci_low: float
    ci_high: float
    f_statistic: float
    df1: float
    df2: float
    p_value: float


@dataclass
class ICCResult(_Result):
    """Intraclass correlations (unitless) of n subjects rated by k readers, Shrout & Fleiss (1979) forms."""

    n_subjects: int
    n_readers: int
    confidence: float
    estimates: list
    method: str

    def get(self, form: str) -> ICCEstimate:
        for e in self.estimates:
            if e.form == form:
                return e
        raise KeyError(form)

    def to_dict(self) -> dict:
        d = _clean(asdict(self))
        return d


def icc(ratings, confidence: float = 0.95, omit_missing: bool = False) -> ICCResult:
    """ICC(1,1), ICC(2,1) and ICC(3,1) (Shrout & Fleiss 1979; McGraw & Wong 1996 CIs) from a two-way ANOVA.

    ``ratings``: array (n_subjects, k_readers), each row one subject (e.g. one biopsy site) and each column one
    reader's measurement of the same quantity. Forms:
    - ICC(2,1): two-way random effects, absolute agreement, single reader (readers are a sample of readers);
    - ICC(3,1): two-way mixed effects, consistency, single reader (these readers only);
    - ICC(1,1): one-way random effects, for reference.
    CI of ICC(2,1) uses the McGraw & Wong (1996) approximate F degrees of freedom; ICC(1,1)/(3,1) exact F.
    """
    confidence = _check_confidence(confidence)
    try:
        x = np.asarray(ratings, dtype=float)
    except (TypeError, ValueError):
        raise InputDataError("ratings contain non-numeric entries; give one number per subject and reader.") from None
    if x.ndim != 2:
        raise InputDataError(f"ratings must be a table subjects x readers, got shape {x.shape}.")
    if np.isinf(x).any():
        raise InputDataError("ratings contain infinite values; check the source data.")
    nan_rows = np.isnan(x).any(axis=1)
    if nan_rows.any():
        if not omit_missing:
            raise InputDataError(
                f"{int(nan_rows.sum())} subject(s) lack a rating from some reader; fill them in or ask for incomplete subjects to be omitted."
            )
        x = x[~nan_rows]
    n, k = x.shape
    if k < 2:
        raise InputDataError(f"ICC needs at least 2 readers, got {k}.")
    if n < 3:
        raise InputDataError(f"ICC needs at least 3 subjects rated by every reader, got {n}.")
    grand = x.mean()
    ss_rows = k * np.sum((x.mean(axis=1) - grand) ** 2)
    ss_cols = n * np.sum((x.mean(axis=0) - grand) ** 2)
    ss_tot = np.sum((x - grand) ** 2)
    ss_err = max(ss_tot - ss_rows - ss_cols, 0.0)
    df_r, df_c, df_e = n - 1, k - 1, (n - 1) * (k - 1)
    msr, msc, mse = ss_rows / df_r, ss_cols / df_c, ss_err / df_e
    msw = (ss_cols + ss_err) / (n * (k - 1))
    if ss_tot == 0:
        raise InputDataError("every rating is identical; the ICC is undefined (no between-subject variance).")
    alpha = 1.0 - confidence
    fq = _st.f.ppf

    def _ratio(a, b):
        return a / b if b > 0 else np.inf

    est = []
    # ICC(1,1)
    icc1 = (msr - msw) / (msr + (k - 1) * msw)
    f1 = _ratio(msr, msw)
    df2_1 = n * (k - 1)
    fl = f1 / fq(1 - alpha / 2, df_r, df2_1)
    fu = f1 * fq(1 - alpha / 2, df2_1, df_r)
    est.append(ICCEstimate("ICC(1,1)", "one-way random effects, absolute agreement, single reader", float(icc1),
                           float((fl - 1) / (fl + k - 1)), float((fu - 1) / (fu + k - 1)) if np.isfinite(fu) else 1.0,
                           float(f1), df_r, df2_1, float(_st.f.sf(f1, df_r, df2_1))))
    # ICC(2,1)
    icc2 = (msr - mse) / (msr + (k - 1) * mse + k * (msc - mse) / n)
    f2 = _ratio(msr, mse)
    if mse > 0:
        a = k * icc2 / (n * (1 - icc2))
        b = 1 + k * icc2 * (n - 1) / (n * (1 - icc2))
        v = (a * msc + b * mse) ** 2 / ((a * msc) ** 2 / df_c + (b * mse) ** 2 / df_e)
        fl2 = fq(1 - alpha / 2, df_r, v)
        fu2 = fq(1 - alpha / 2, v, df_r)
        lo2 = n * (msr - fl2 * mse) / (fl2 * (k * msc + (k * n - k - n) * mse) + n * msr)
        hi2 = n * (fu2 * msr - mse) / (k * msc + (k * n - k - n) * mse + n * fu2 * msr)
    else:
        lo2 = hi2 = float(icc2)
    est.append(ICCEstimate("ICC(2,1)", "two-way random effects, absolute agreement, single reader", float(icc2),
                           float(lo2), float(hi2), float(f2), df_r, df_e,
                           float(_st.f.sf(f2, df_r, df_e)) if np.isfinite(f2) else 0.0))
    # ICC(3,1)
    icc3 = (msr - mse) / (msr + (k - 1) * mse)
    if mse > 0:
        fl3 = f2 / fq(1 - alpha / 2, df_r, df_e)
        fu3 = f2 * fq(1 - alpha / 2, df_e, df_r)
        lo3, hi3 = (fl3 - 1) / (fl3 + k - 1), (fu3 - 1) / (fu3 + k - 1)
    else:
        lo3 = hi3 = float(icc3)
    est.append(ICCEstimate("ICC(3,1)", "two-way mixed effects, consistency, single reader", float(icc3),
                           float(lo3), float(hi3), float(f2), df_r, df_e,
                           float(_st.f.sf(f2, df_r, df_e)) if np.isfinite(f2) else 0.0))
    return ICCResult(
        n_subjects=int(n), n_readers=int(k), confidence=confidence, estimates=est,
        method="two-way ANOVA mean squares; Shrout & Fleiss (1979) ICC(1,1), ICC(2,1) absolute agreement, "
               "ICC(3,1) consistency; F-based CIs (McGraw & Wong 1996 approximate df for ICC(2,1))",
    )


def icc_two_readers(reader1, reader2, confidence: float = 0.95, omit_missing: bool = False) -> ICCResult:
    """ICC for two readers measuring the same subjects (see :func:`icc`); reader1[i] and reader2[i] pair up."""
    a, b = _paired(reader1, reader2, ("reader 1", "reader 2"), 3, omit_missing)
    return icc(np.column_stack([a, b]), confidence=confidence)
