"""Observation model of beamkin (docs/design.md, section 4, "Observation model") as Numba kernels.

For frame j with exposure window [lo_j, hi_j] = [t_j - e_j/2, t_j + e_j/2] (seconds)::

    mu_j = A * mean over t in [lo_j, hi_j] of alpha(k (t - t0))      (alpha(x) = 0 for x < 0)
         = A * alpha(k (t_j - t0))                                  when e_j = 0
    y_j  ~ Normal(mu_j, sigma_j^2 + s^2)            (noise kind 0)
    y_j  ~ Student-t_nu(mu_j, scale^2 = sigma_j^2 + s^2)  (noise kind 1)

The exposure mean is (1/(x_b - x_a)) * integral of alpha over [x_a, x_b] in x = k (t - t0):
the part beyond the saturation point (alpha == 1 exactly, see ``models.saturation_x``)
is integrated exactly, the transition part from the antiderivative for F1, F2, F3, A2, R2,
R3, D1, D2, D3 and Pn, and for A3, A4, An and D4 with an 8-point Gauss-Legendre rule on pieces
of width <= 1/4; a range that starts at the onset x = 0 uses x = u^2 and one that ends
at the saturation point uses x = xs - u^2, which removes the square-root / logarithmic
behaviour of D1, D2, D3, D4 and An (n < 1) at these points (accuracy ~1e-8 or better).

Particle parameters are rows ``(t0 [s], log k [log 1/s], log s, A, n)``.

The full-history log likelihood ``history_loglik`` splits the frames of one particle
into three runs: before the onset (mu = 0), transition, and completed (mu = A).  With a
Normal noise model and a frame-independent sigma (e.g. sigma unknown -> 0) the first
and last runs cost O(1) through prefix sums of y and y^2; otherwise they are a cheap
loop without model evaluations.  Frames must be stored with nondecreasing window starts
and ends (the engine checks this).

``frame_loglik`` and ``history_loglik`` come in a serial and a ``*_parallel`` (prange over
particles) form with identical results: every particle is independent, no reductions.  The
parallel form only pays on cores that are not shared: under oversubscription the OpenMP
threads wait for each other (measured 40x slower on a loaded 2-core host).
"""

from __future__ import annotations

import math

import numba
import numpy as np

from .models import alpha_of_x, saturation_x
from .particles import log_normalise

NOISE_NORMAL = 0
NOISE_STUDENT = 1

_GL_X, _GL_W = np.polynomial.legendre.leggauss(8)
GL_NODES = np.ascontiguousarray(_GL_X)
GL_WEIGHTS = np.ascontiguousarray(_GL_W)
_MAX_PIECES = 256
_PIECE = 0.25  # widest Gauss-Legendre piece (x or substituted-u units)
_LOG_2PI = math.log(2.0 * math.pi)


@numba.njit(cache=True, nogil=True)
def _gl(code, n, ua, ub, mode, origin):
    """Gauss-Legendre integral of alpha over a variable range, on pieces of width <= 1/4.

    mode 0: integrand alpha(u) over u in [ua, ub] (plain x);
    mode 1: x = u^2 (dx = 2u du), removes sqrt behaviour at the onset x = 0;
    mode 2: x = origin - u^2, removes sqrt/log behaviour at a finite domain end ``origin``.
    """
    pieces = int(math.ceil((ub - ua) / _PIECE))
    if pieces < 1:
        pieces = 1
    if pieces > _MAX_PIECES:
        pieces = _MAX_PIECES
    width = (ub - ua) / pieces
    half = 0.5 * width
    total = 0.0
    for p in range(pieces):
        mid = ua + p * width + half
        acc = 0.0
        for q in range(GL_NODES.shape[0]):
            u = mid + half * GL_NODES[q]
            if mode == 0:
                acc += GL_WEIGHTS[q] * alpha_of_x(code, u, n)
            elif mode == 1:
                acc += GL_WEIGHTS[q] * 2.0 * u * alpha_of_x(code, u * u, n)
            else:
                acc += GL_WEIGHTS[q] * 2.0 * u * alpha_of_x(code, origin - u * u, n)
        total += acc * half
    return total


@numba.njit(cache=True, nogil=True)
def _d2_antiderivative(alpha):
    """H(alpha) with dH/dalpha = alpha g'(alpha) for D2, g(alpha) = (1 - alpha) ln(1 - alpha) + alpha:
    with u = 1 - alpha, H = u ln u - u - u^2 ln u / 2 + u^2 / 4."""
    u = 1.0 - alpha
    if u <= 0.0:
        return 0.0
    lu = math.log(u)
    return u * lu - u - 0.5 * u * u * lu + 0.25 * u * u


@numba.njit(cache=True, nogil=True)
def closed_form_integral(code, a, b):
    """Integral of alpha(x) dx over [a, b] (0 <= a < b <= saturation point) from the
    antiderivative, or NaN for the models without one in elementary functions and erf
    (A3, A4, An, D4).

    With w = b - a, every difference of powers is factored through w so that the absolute
    error is ~1e-16 * w, i.e. ~1e-16 in the exposure mean integral / w:
    F1: w + exp(-a) expm1(-w); F2: w - log1p(w / (1 + a));
    F3: w - 2 w / (sqrt(1 + 2b) + sqrt(1 + 2a));
    R2: w - [(1-a)^3 - (1-b)^3] / 3; R3: w - [(1-a)^4 - (1-b)^4] / 4;
    D1: 2/3 (b^1.5 - a^1.5); D3 (alpha = 3 x^0.5 - 3 x + x^1.5):
    2 (b^1.5 - a^1.5) - 1.5 (b^2 - a^2) + 0.4 (b^2.5 - a^2.5); Pn: (b^(n+1) - a^(n+1)) / (n+1);
    A2: w - sqrt(pi)/2 (erf(b) - erf(a));
    D2 (substituting x = g(alpha)): H(alpha(b)) - H(alpha(a)) (``_d2_antiderivative``).
    The A2 and D2 differences are not factored: used for w >= 1e-4 only (error <= ~1e-12 in
    the mean); NaN below, where the Gauss-Legendre rule is cheap.
    """
    w = b - a
    if code == 0:
        return w + math.exp(-a) * math.expm1(-w)
    elif code == 1:
        return w - math.log1p(w / (1.0 + a))
    elif code == 2:
        return w - 2.0 * w / (math.sqrt(1.0 + 2.0 * b) + math.sqrt(1.0 + 2.0 * a))
    elif code == 3:
        if w < 1e-4:
            return math.nan
        # w - sqrt(pi)/2 (erf(b) - erf(a)), with erfc on the tail where erf rounds to 1
        if a > 1.0:
            return w - 0.5 * math.sqrt(math.pi) * (math.erfc(a) - math.erfc(b))
        return w - 0.5 * math.sqrt(math.pi) * (math.erf(b) - math.erf(a))
    elif code == 7 or code == 8:
        p, q = 1.0 - a, 1.0 - b
        if code == 7:  # p^3 - q^3 = w (p^2 + p q + q^2)
            return w * (1.0 - (p * p + p * q + q * q) / 3.0)
        return w * (1.0 - (p + q) * (p * p + q * q) / 4.0)  # p^4 - q^4 = w (p + q)(p^2 + q^2)
    elif code == 9 or code == 11:
        ra, rb = math.sqrt(a), math.sqrt(b)
        d15 = w * (b * b + a * b + a * a) / (b * rb + a * ra)  # b^1.5 - a^1.5 = (b^3 - a^3) / (b^1.5 + a^1.5)
        if code == 9:
            return d15 * (2.0 / 3.0)
        d25 = w * (b ** 4 + b ** 3 * a + b * b * a * a + b * a ** 3 + a ** 4) / (b * b * rb + a * a * ra)
        return 2.0 * d15 - 1.5 * w * (a + b) + 0.4 * d25
    elif code == 10:
        if w < 1e-4:
            return math.nan
        return _d2_antiderivative(alpha_of_x(10, b, 1.0)) - _d2_antiderivative(alpha_of_x(10, a, 1.0))
    elif code == 13:
        return w * (b * b + a * b + a * a) / 3.0
    elif code == 14:
        return w * (a + b) * (a * a + b * b) / 4.0
    elif code == 15:
        return w * (b ** 4 + b ** 3 * a + b * b * a * a + b * a ** 3 + a ** 4) / 5.0
    return math.nan


@numba.njit(cache=True, nogil=True)
def integral_gauss_legendre(code, n, a, b, xs):
    """Integral of alpha(x) dx over [a, b] with 0 <= a < b <= xs (xs: saturation point) by
    Gauss-Legendre: ranges close to the onset (a < b - a) use x = u^2, ranges close to a
    finite saturation point (xs - b < b - a) use x = xs - u^2; both: split in the middle.
    """
    width = b - a
    near_onset = a < width
    near_end = xs - b < width
    if near_onset and near_end:
        m = 0.5 * (a + b)
        return (_gl(code, n, math.sqrt(a), math.sqrt(m), 1, 0.0)
                + _gl(code, n, math.sqrt(max(xs - b, 0.0)), math.sqrt(xs - m), 2, xs))
    if near_onset:
        return _gl(code, n, math.sqrt(a), math.sqrt(b), 1, 0.0)
    if near_end:
        return _gl(code, n, math.sqrt(max(xs - b, 0.0)), math.sqrt(xs - a), 2, xs)
    return _gl(code, n, a, b, 0, 0.0)


@numba.njit(cache=True, nogil=True)
def integral_alpha(code, n, a, b, xs):
    """Integral of alpha(x) dx over [a, b] with 0 <= a < b <= xs (xs: saturation point):
    closed form where there is one, Gauss-Legendre otherwise."""
    exact = closed_form_integral(code, a, b)
    if exact == exact:
        return exact
    return integral_gauss_legendre(code, n, a, b, xs)


@numba.njit(cache=True, nogil=True)
def exposure_mean_alpha(code, n, t0, k, t_lo, t_hi):
    """Mean of alpha(k (t - t0)) over t in [t_lo, t_hi] (s); alpha at t_lo when t_hi <= t_lo."""
    xa = k * (t_lo - t0)
    if not (t_hi > t_lo):
        return alpha_of_x(code, xa, n)
    xb = k * (t_hi - t0)
    if xb <= 0.0:
        return 0.0
    xs = saturation_x(code, n)
    a = max(xa, 0.0)
    b = min(xb, xs)
    total = 0.0
    if b > a:
        total += integral_alpha(code, n, a, b, xs)
    if xb > xs:
        total += xb - max(xa, xs)
    return total / (xb - xa)


@numba.njit(cache=True, nogil=True)
def _student_const(nu):
    return math.lgamma(0.5 * (nu + 1.0)) - math.lgamma(0.5 * nu) - 0.5 * math.log(nu * math.pi)


@numba.njit(cache=True, nogil=True)
def log_density(resid, var, kind, nu, student_const):
    """log p(resid) for Normal(0, var) (kind 0) or Student-t_nu with scale^2 var (kind 1)."""
    if kind == 0:
        return -0.5 * (_LOG_2PI + math.log(var) + resid * resid / var)
    return student_const - 0.5 * math.log(var) - 0.5 * (nu + 1.0) * math.log1p(resid * resid / (nu * var))


@numba.njit(cache=True, nogil=True)
def _particle_frame_loglik(code, p, t_lo, t_hi, y, sig2, kind, nu, sc):
    t0 = p[0]
    k = math.exp(p[1])
    s = math.exp(p[2])
    mu = p[3] * exposure_mean_alpha(code, p[4], t0, k, t_lo, t_hi)
    return log_density(y - mu, sig2 + s * s, kind, nu, sc)


def _frame_loglik_impl(code, params, t_lo, t_hi, y, sig2, kind, nu, out):
    """log p(y | particle) of one frame for every particle row of ``params`` into ``out``."""
    sc = _student_const(nu)
    for i in numba.prange(params.shape[0]):
        out[i] = _particle_frame_loglik(code, params[i], t_lo, t_hi, y, sig2, kind, nu, sc)


# one body, compiled serial and parallel (prange is range in the serial build)
frame_loglik = numba.njit(cache=True, nogil=True)(_frame_loglik_impl)
frame_loglik_parallel = numba.njit(cache=True, nogil=True, parallel=True)(_frame_loglik_impl)


@numba.njit(cache=True, nogil=True)
def reweight_frames(code, params, first, last, t_lo, t_hi, y, sig2, kind, nu, loglik_sum, base_logw, logw_out):
    """Importance reweighting of particles by frames [first, last) (IBIS without the move).

    Adds sum_{p=first}^{last-1} log p(y_p | theta_i) to ``loglik_sum[i]`` (NaN counts as a
    zero likelihood), writes the normalised log weights
    ``logw_out[i] = base_logw[i] + loglik_sum[i] - c`` and returns
    c = log sum_i exp(base_logw[i] + loglik_sum[i]) (``particles.log_normalise``), the log
    evidence increment when ``base_logw`` is normalised (-inf when no particle explains the
    frames; then ``logw_out`` holds the unnormalised log weights, all -inf).
    """
    sc = _student_const(nu)
    n = params.shape[0]
    for i in range(n):
        for p in range(first, last):
            v = _particle_frame_loglik(code, params[i], t_lo[p], t_hi[p], y[p], sig2[p], kind, nu, sc)
            loglik_sum[i] += v if v == v else -math.inf
        logw_out[i] = base_logw[i] + loglik_sum[i]
    return log_normalise(logw_out, logw_out)


@numba.njit(cache=True, nogil=True)
def _constant_mean_run(mu, var_s2, a, b, y, sig2, cy, cy2, homo_var, kind, nu, sc):
    """Sum of log densities of frames [a, b) whose mean is the constant mu."""
    if b <= a:
        return 0.0
    if kind == 0 and homo_var >= 0.0:
        var = homo_var + var_s2
        c = b - a
        s1 = cy[b] - cy[a]
        s2 = cy2[b] - cy2[a]
        ss = s2 - 2.0 * mu * s1 + c * mu * mu
        if ss < 0.0:
            ss = 0.0
        return -0.5 * c * (_LOG_2PI + math.log(var)) - 0.5 * ss / var
    total = 0.0
    for j in range(a, b):
        total += log_density(y[j] - mu, sig2[j] + var_s2, kind, nu, sc)
    return total


@numba.njit(cache=True, nogil=True)
def _tempered_constant_run(mu, var_s2, a, b, m, lam, y, sig2, cy, cy2, homo_var, kind, nu, sc):
    """Frames [a, b) of constant mean mu: those before m at full weight, those from m on times lam."""
    split = min(max(m, a), b)
    total = _constant_mean_run(mu, var_s2, a, split, y, sig2, cy, cy2, homo_var, kind, nu, sc)
    if lam > 0.0 and b > split:
        total += lam * _constant_mean_run(mu, var_s2, split, b, y, sig2, cy, cy2, homo_var, kind, nu, sc)
    return total


@numba.njit(cache=True, nogil=True)
def particle_history_loglik(code, p, m, m_end, lam, t_lo, t_hi, y, sig2, cy, cy2, homo_var, kind, nu, sc):
    """Tempered history log likelihood of one particle:

        sum_{j < m} log p(y_j | p) + lam * sum_{m <= j < m_end} log p(y_j | p)

    (the target of IBIS while a batch of frames [m, m_end) is being tempered in; m_end = m or
    lam = 0 gives the posterior of frames [0, m)).  Frames split into runs before the onset
    (mean 0), in the transition and after saturation (mean A); the constant runs cost O(1)
    through prefix sums when the noise is Normal with a common sigma_j.
    """
    t0 = p[0]
    k = math.exp(p[1])
    s2 = math.exp(2.0 * p[2])
    A = p[3]
    n = p[4]
    last = m_end if lam > 0.0 else m
    if last < m:
        last = m
    j_on = np.searchsorted(t_hi[:last], t0, side="right")
    xs = saturation_x(code, n)
    j_done = last
    if xs < math.inf:
        t_sat = t0 + xs / k
        j_done = np.searchsorted(t_lo[:last], t_sat, side="left")
        if j_done < j_on:
            j_done = j_on
    total = _tempered_constant_run(0.0, s2, 0, j_on, m, lam, y, sig2, cy, cy2, homo_var, kind, nu, sc)
    for j in range(j_on, j_done):
        mu = A * exposure_mean_alpha(code, n, t0, k, t_lo[j], t_hi[j])
        v = log_density(y[j] - mu, sig2[j] + s2, kind, nu, sc)
        total += v if j < m else lam * v
    total += _tempered_constant_run(A, s2, j_done, last, m, lam, y, sig2, cy, cy2, homo_var, kind, nu, sc)
    return total


def _history_loglik_impl(code, params, m, m_end, lam, t_lo, t_hi, y, sig2, cy, cy2, homo_var, kind, nu, out):
    """Tempered full-history log likelihood for every particle row into ``out``:

    out_i = sum_{j < m} log p(y_j | theta_i) + lam * sum_{m <= j < m_end} log p(y_j | theta_i)

    ``cy``/``cy2`` are prefix sums of y and y^2 (length >= m_end + 1); ``homo_var`` is the
    common sigma_j^2 of all frames, or -1 when sigma varies between frames.
    """
    sc = _student_const(nu)
    for i in numba.prange(params.shape[0]):
        out[i] = particle_history_loglik(code, params[i], m, m_end, lam, t_lo, t_hi, y, sig2, cy, cy2, homo_var,
                                         kind, nu, sc)


history_loglik = numba.njit(cache=True, nogil=True)(_history_loglik_impl)
history_loglik_parallel = numba.njit(cache=True, nogil=True, parallel=True)(_history_loglik_impl)


@numba.njit(cache=True, nogil=True)
def alpha_curves(code, params, times, out):
    """A * alpha(k (t - t0)) for every particle row (rows) and time in ``times`` (columns)."""
    for i in range(params.shape[0]):
        t0 = params[i, 0]
        k = math.exp(params[i, 1])
        A = params[i, 3]
        n = params[i, 4]
        for g in range(times.shape[0]):
            out[i, g] = A * alpha_of_x(code, k * (times[g] - t0), n)


def _mh_sweep_impl(code, theta, cur_ll, free_cols, lo, hi, mean, chol, chol_inv, rw_step, z, use_ind, log_u,
                   m, m_end, lam, t_lo, t_hi, y, sig2, cy, cy2, homo_var, kind, nu, accepted):
    """One Metropolis-Hastings sweep over all particles (in place), random numbers given.

    Proposal per particle i (free coordinates x, d of them; L = chol, cov = L L^T):
    independent x' = mean + L z_i when use_ind[i], else random walk x' = x + rw_step L z_i.
    Accept when x' is inside the prior box [lo, hi] and
    log_u[i] < loglik(x') - loglik(x) + [independent: log q(x) - log q(x')].
    """
    sc = _student_const(nu)
    d = free_cols.shape[0]
    for i in numba.prange(theta.shape[0]):
        prop = theta[i].copy()
        step = np.zeros(d)
        for a in range(d):
            acc = 0.0
            for b in range(a + 1):
                acc += chol[a, b] * z[i, b]
            step[a] = acc
        inside = True
        log_q = 0.0
        if use_ind[i]:
            maha_x = 0.0
            maha_p = 0.0
            for a in range(d):
                acc = 0.0
                for b in range(a + 1):
                    acc += chol_inv[a, b] * (theta[i, free_cols[b]] - mean[b])
                maha_x += acc * acc
                maha_p += z[i, a] * z[i, a]
            log_q = -0.5 * maha_x + 0.5 * maha_p
        for a in range(d):
            c = free_cols[a]
            if use_ind[i]:
                v = mean[a] + step[a]
            else:
                v = theta[i, c] + rw_step * step[a]
            if not (v >= lo[a] and v <= hi[a]):
                inside = False
            prop[c] = v
        accepted[i] = False
        if not inside:
            continue
        ll = particle_history_loglik(code, prop, m, m_end, lam, t_lo, t_hi, y, sig2, cy, cy2, homo_var, kind, nu,
                                     sc)
        if log_u[i] < ll - cur_ll[i] + log_q:
            for c in range(theta.shape[1]):
                theta[i, c] = prop[c]
            cur_ll[i] = ll
            accepted[i] = True


mh_sweep = numba.njit(cache=True, nogil=True)(_mh_sweep_impl)
mh_sweep_parallel = numba.njit(cache=True, nogil=True, parallel=True)(_mh_sweep_impl)


@numba.njit(cache=True, nogil=True)
def null_frames_loglik(log_s, first, last, y, sig2, kind, nu, out):
    """"No reaction" (alpha = 0 at every frame): adds sum_{j=first}^{last-1} log p(y_j | mu = 0,
    sigma_j^2 + s^2) to ``out[g]`` for every scatter s = exp(log_s[g]) of a grid."""
    sc = _student_const(nu)
    for g in range(log_s.shape[0]):
        s2 = math.exp(2.0 * log_s[g])
        total = 0.0
        for j in range(first, last):
            total += log_density(y[j], sig2[j] + s2, kind, nu, sc)
        out[g] += total
