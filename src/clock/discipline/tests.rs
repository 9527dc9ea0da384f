//! The discipline against simulated references: a true UTC that drifts against the local
//! clock, honest sources whose stated distance covers their error, and liars.

use super::*;

const S: u64 = NS_PER_S;
const POLL: u64 = 16 * S;
/// Local time where the simulations start (2026-11-26, as local nanoseconds).
const T0: u64 = 1_795_000_000 * S;

/// A deterministic xorshift generator.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [-span, span].
    fn spread(&mut self, span: i64) -> i64 {
        if span == 0 {
            return 0;
        }
        (self.next() % (2 * span as u64 + 1)) as i64 - span
    }
}

/// The true offset UTC − local: a start offset, a drift of the local oscillator, and leap
/// seconds already passed.
struct Truth {
    offset0: i64,
    drift: f64,
    leap_at_utc: Option<u64>,
}

impl Truth {
    fn offset(&self, t: u64) -> i64 {
        let base = self.offset0 + (self.drift * (t - T0) as f64) as i64;
        match self.leap_at_utc {
            Some(leap) if (t as i64 + base) as u64 >= leap => base - S as i64,
            _ => base,
        }
    }
    fn utc(&self, t: u64) -> u64 {
        (t as i64 + self.offset(t)) as u64
    }
}

#[derive(Clone)]
struct Sim {
    /// Constant error of an honest source, within its stated dispersion.
    bias: i64,
    jitter: i64,
    delay: u64,
    root_dispersion: u64,
    precision: u64,
    /// A liar's offset from the truth.
    lie: i64,
    up: bool,
    leap: Leap,
    independent: bool,
    lineage: Lineage,
}

/// Five honest servers within 100 µs of the truth.
fn five_honest() -> Run {
    Run::new(vec![
        honest(0),
        honest(100),
        honest(-100),
        honest(50),
        honest(-50),
    ])
}

fn honest(bias_us: i64) -> Sim {
    Sim {
        bias: bias_us * 1_000,
        jitter: 50_000,
        delay: 400_000,
        root_dispersion: 600_000,
        precision: 1_000,
        lie: 0,
        up: true,
        leap: Leap::None,
        independent: false,
        lineage: Lineage::default(),
    }
}

fn liar(lie_ms: i64) -> Sim {
    Sim {
        lie: lie_ms * 1_000_000,
        ..honest(0)
    }
}

struct Run {
    d: Discipline,
    truth: Truth,
    sims: Vec<Sim>,
    rng: Rng,
    now: u64,
    events: Vec<Event>,
    /// Whether the truth must lie within the bound (off once a lying majority was followed).
    check: bool,
}

impl Run {
    fn new(sims: Vec<Sim>) -> Self {
        Self::with(sims, DisciplineConfig::default(), 0.0)
    }

    fn with(sims: Vec<Sim>, config: DisciplineConfig, drift: f64) -> Self {
        let specs = sims
            .iter()
            .enumerate()
            .map(|(i, s)| SourceSpec {
                name: format!("s{i}"),
                independent: s.independent,
            })
            .collect();
        Self {
            d: Discipline::new(config, specs),
            truth: Truth {
                offset0: 1_234_567_891,
                drift,
                leap_at_utc: None,
            },
            sims,
            rng: Rng(0x9e37_79b9_7f4a_7c15),
            now: T0,
            events: Vec::new(),
            check: true,
        }
    }

    /// One poll round: every source answers (or not), then an update; the estimate is checked
    /// against the truth right after the update and half a poll later.
    fn round(&mut self) {
        self.now += POLL;
        self.answer();
        self.d.update(self.now);
        self.events.extend(self.d.drain_events());
        self.check_truth(self.now);
        self.check_truth(self.now + POLL / 2);
    }

    /// Every source answers (or not) at `now`, without an update.
    fn answer(&mut self) {
        for (i, sim) in self.sims.clone().iter().enumerate() {
            if !sim.up {
                self.d.missed(i);
                continue;
            }
            let at = self.now - sim.delay / 2;
            let offset = self.truth.offset(at) + sim.bias + sim.lie + self.rng.spread(sim.jitter);
            self.d.sample(
                i,
                Sample {
                    at,
                    offset,
                    delay: sim.delay,
                    root_delay: 0,
                    root_dispersion: sim.root_dispersion,
                    precision: sim.precision,
                    leap: sim.leap,
                    lineage: sim.lineage,
                },
            );
        }
    }

    fn rounds(&mut self, n: usize) {
        for _ in 0..n {
            self.round();
        }
    }

    /// While the state lets tokens be issued, the truth lies within the bound.
    fn check_truth(&self, t: u64) {
        let e = self.d.estimate(t);
        if self.check && e.state != SyncState::Unsynchronized {
            let error = (e.utc_ns as i64 - self.truth.utc(t) as i64).unsigned_abs();
            assert!(
                error <= e.bound_ns,
                "at +{} s: error {error} ns exceeds bound {} ns ({:?}: {})",
                (t - T0) / S,
                e.bound_ns,
                e.state,
                e.reason
            );
        }
    }

    /// The first three sources answer `ns` off the truth from now on.
    fn first_three_lie_by(&mut self, ns: i64) {
        for sim in &mut self.sims[..3] {
            sim.lie = ns;
        }
    }

    /// Whether a step was followed so far.
    fn accepted_a_step(&self) -> bool {
        self.events
            .iter()
            .any(|e| matches!(e, Event::StepAccepted { .. }))
    }

    fn state(&self) -> SyncState {
        self.d.estimate(self.now).state
    }

    fn selections(&self) -> Vec<Selection> {
        self.d
            .source_views(self.now)
            .iter()
            .map(|v| v.selection)
            .collect()
    }
}

#[test]
fn five_honest_sources_synchronize_with_a_tight_bound() {
    let mut run = Run::new(vec![
        honest(100),
        honest(-200),
        honest(0),
        honest(300),
        honest(-50),
    ]);
    run.round();
    assert_eq!(run.state(), SyncState::Synchronized);
    run.rounds(20);
    assert_eq!(run.state(), SyncState::Synchronized);
    assert!(run.selections().iter().all(|s| *s == Selection::Selected));
    let e = run.d.estimate(run.now);
    assert!(e.bound_ns < 5_000_000, "bound {}", e.bound_ns);
    assert!(matches!(run.events[0], Event::SourceReachable { .. }));
    assert!(run
        .events
        .iter()
        .any(|e| matches!(e, Event::Changed(Change::Synchronized { .. }))));
}

#[test]
fn one_or_two_falsetickers_are_never_selected() {
    for liars in [
        vec![liar(2_000)],
        vec![liar(2_000), liar(-3_000)],
        vec![liar(50), liar(50)],
    ] {
        let mut sims = vec![honest(100), honest(-100), honest(0)];
        let first_liar = sims.len();
        sims.extend(liars.clone());
        let mut run = Run::new(sims);
        for _ in 0..20 {
            run.round();
            assert_eq!(run.state(), SyncState::Synchronized);
            let sel = run.selections();
            assert!(
                sel[first_liar..]
                    .iter()
                    .all(|s| *s == Selection::Falseticker),
                "{sel:?}"
            );
            assert!(
                sel[..first_liar].iter().all(|s| *s == Selection::Selected),
                "{sel:?}"
            );
        }
    }
}

#[test]
fn three_falsetickers_or_too_few_sources_do_not_synchronize() {
    let mut run = Run::new(vec![
        honest(0),
        honest(50),
        liar(2_000),
        liar(-2_000),
        liar(5_000),
    ]);
    run.rounds(5);
    assert_eq!(run.state(), SyncState::Unsynchronized);
    assert!(run.d.estimate(run.now).reason.contains("agree"));
    assert!(run.selections().iter().all(|s| *s == Selection::Unselected));

    let mut down = honest(0);
    down.up = false;
    let mut run = Run::new(vec![
        honest(0),
        honest(50),
        down.clone(),
        down.clone(),
        down,
    ]);
    run.rounds(5);
    assert_eq!(run.state(), SyncState::Unsynchronized);
}

#[test]
fn silencing_honest_sources_never_hands_the_clock_to_a_minority() {
    // Seven configured servers. An attacker blocks the four honest ones and steps the other
    // three by +2 s: three of seven is no majority, whoever else answers.
    let sims: Vec<Sim> = (0..7).map(|i| honest(i * 30 - 90)).collect();
    let mut run = Run::new(sims);
    run.rounds(10);
    assert_eq!(run.state(), SyncState::Synchronized);
    let before = run.d.estimate(run.now).utc_ns as i64 - run.now as i64;
    for sim in &mut run.sims[3..] {
        sim.up = false;
    }
    for sim in &mut run.sims[..3] {
        sim.lie = 2 * S as i64;
    }
    // The honest sources' last samples count while their reach register holds any; then the
    // liars are all that answer. Far past that and the confirmation rounds, the clock never
    // takes their time (the harness checks that the truth stays within the bound while
    // tokens may be issued), and it ends unsynchronized: the liars contradict the model.
    for round in 0..60 {
        run.round();
        let e = run.d.estimate(run.now);
        let offset = e.utc_ns as i64 - run.now as i64;
        assert!((offset - before).abs() < 10_000_000, "round {round}");
    }
    assert_eq!(run.state(), SyncState::Unsynchronized);
    assert!(!run.accepted_a_step());

    // From the start, with only the three liars answering: never synchronized.
    let mut sims: Vec<Sim> = (0..7).map(|_| liar(2_000)).collect();
    for sim in &mut sims[3..] {
        sim.up = false;
    }
    let mut run = Run::new(sims);
    for _ in 0..20 {
        run.round();
        assert_eq!(run.state(), SyncState::Unsynchronized);
    }
    assert!(
        run.d.estimate(run.now).reason.contains("7 configured"),
        "{}",
        run.d.estimate(run.now).reason
    );
}

#[test]
fn losing_sources_after_synchronizing_is_holdover_with_a_growing_bound() {
    // The oscillator drifts by 10 ppm, within the 15 ppm the bound assumes.
    let sims = vec![honest(0), honest(100), honest(-100), honest(50)];
    let mut run = Run::with(sims, DisciplineConfig::default(), 10e-6);
    run.rounds(30);
    assert_eq!(run.state(), SyncState::Synchronized);
    let freq = run.d.system_view(run.now).frequency_ppm.unwrap();
    assert!((freq - 10.0).abs() < 1.0, "frequency {freq} ppm");

    for sim in &mut run.sims {
        sim.up = false;
    }
    let mut last_bound = 0;
    // Twenty hours without a reference, checked every poll. The last samples count until
    // they are older than the sample age limit (300 s); then it is holdover.
    for round in 0..(20 * 3600 / 16) {
        run.round();
        let e = run.d.estimate(run.now);
        if round >= 300 / 16 {
            assert_eq!(e.state, SyncState::Holdover, "round {round}");
        }
        assert!(e.bound_ns >= last_bound, "the bound shrank in holdover");
        last_bound = e.bound_ns;
    }
    assert!(
        last_bound > S,
        "after 20 h at 15 ppm the bound passes 1 s: {last_bound}"
    );
    assert!(run
        .events
        .iter()
        .any(|e| matches!(e, Event::Changed(Change::Holdover { .. }))));
    assert!(run
        .events
        .iter()
        .any(|e| matches!(e, Event::SourceUnreachable { .. })));
}

#[test]
fn sources_lost_one_by_one_mean_holdover_and_never_a_refusal_in_between() {
    let mut run = Run::new(vec![honest(0), honest(100), honest(-100)]);
    run.rounds(10);
    assert_eq!(run.state(), SyncState::Synchronized);
    // The sources fall silent one after another: two agreeing sources, then one, are too
    // few to select from (min_agreeing 3), as none are.
    let mut states = Vec::new();
    for down in 0..3 {
        run.sims[down].up = false;
        for _ in 0..12 {
            run.round();
            states.push(run.state());
        }
    }
    assert!(
        states.iter().all(|s| *s != SyncState::Unsynchronized),
        "{states:?}"
    );
    assert_eq!(run.state(), SyncState::Holdover);
    assert!(run.d.estimate(run.now).reason.contains("no source"));
    // One source back is still too few: holdover goes on, then three resynchronize.
    run.sims[0].up = true;
    run.rounds(2);
    assert_eq!(run.state(), SyncState::Holdover);
    assert!(run
        .d
        .estimate(run.now)
        .reason
        .contains("too few usable sources: 1,"));
    for sim in &mut run.sims {
        sim.up = true;
    }
    run.rounds(2);
    assert_eq!(run.state(), SyncState::Synchronized);
}

#[test]
fn a_remaining_source_that_contradicts_the_holdover_stops_it() {
    let mut run = Run::new(vec![honest(0), honest(100), honest(-100)]);
    run.rounds(10);
    run.sims[1].up = false;
    run.sims[2].up = false;
    run.rounds(12);
    assert_eq!(run.state(), SyncState::Holdover);
    // The last source now says the time is 3 s off: too few to follow, but its interval and
    // the model's cannot both hold UTC.
    run.sims[0].lie = 3 * S as i64;
    run.round();
    assert_eq!(run.state(), SyncState::Unsynchronized);
    let reason = run.d.estimate(run.now).reason;
    assert!(
        reason.contains("s0 contradicts") && reason.contains("by +2.99"),
        "{reason}"
    );
    run.sims[0].up = false;
    run.rounds(30);
    assert_eq!(run.state(), SyncState::Unsynchronized);
    run.sims = vec![honest(0), honest(100), honest(-100)];
    run.rounds(3);
    assert_eq!(run.state(), SyncState::Synchronized);
}

#[test]
fn losing_the_sources_never_lifts_a_refusal() {
    // Synchronized on four, then two of them disagree with the other two: no majority, no
    // stamps. The sources then fall silent: the refusal stands (no holdover on a model that
    // the sources disputed) until a majority agrees again.
    let mut run = Run::new(vec![honest(0), honest(50), honest(-50), honest(20)]);
    run.rounds(10);
    assert_eq!(run.state(), SyncState::Synchronized);
    run.sims[2] = liar(3_000);
    run.sims[3] = liar(3_000);
    run.rounds(4);
    assert_eq!(run.state(), SyncState::Unsynchronized);
    for (i, sim) in run.sims.iter_mut().enumerate() {
        sim.up = i == 0;
    }
    for _ in 0..30 {
        run.round();
        assert_eq!(run.state(), SyncState::Unsynchronized);
    }
    for sim in &mut run.sims {
        sim.up = false;
    }
    for _ in 0..30 {
        run.round();
        assert_eq!(run.state(), SyncState::Unsynchronized);
    }
    run.sims = vec![honest(0), honest(50), honest(-50), honest(20)];
    run.rounds(3);
    assert_eq!(run.state(), SyncState::Synchronized);
}

#[test]
fn a_silent_discipline_reports_holdover() {
    let mut run = Run::new(vec![honest(0), honest(10), honest(20)]);
    run.rounds(3);
    let later = run.now + 301 * S;
    let e = run.d.estimate(later);
    assert_eq!(e.state, SyncState::Holdover);
    assert!(e.bound_ns > run.d.estimate(run.now).bound_ns);
}

#[test]
fn a_majority_step_is_not_followed_until_confirmed() {
    let mut run = five_honest();
    run.rounds(10);
    let before = run.d.estimate(run.now).utc_ns as i64 - run.now as i64;
    run.first_three_lie_by(2_000_000_000);
    // Rounds 1 to 3: refused, and the estimate stays on the old time.
    for round in 1..=3 {
        run.round();
        let e = run.d.estimate(run.now);
        assert_eq!(e.state, SyncState::Unsynchronized, "round {round}");
        assert!(e.reason.contains("stepped"), "{}", e.reason);
        let offset = e.utc_ns as i64 - run.now as i64;
        assert!((offset - before).abs() < 10_000_000);
    }
    // Round 4: the step is followed. (Here the majority lies; persisting, it cannot be told
    // from a true step, which is why an independent reference is worth having.)
    run.check = false;
    run.round();
    let e = run.d.estimate(run.now);
    assert_eq!(e.state, SyncState::Synchronized);
    let offset = e.utc_ns as i64 - run.now as i64;
    assert!((offset - before - 2_000_000_000).abs() < 10_000_000);
    assert!(run
        .events
        .iter()
        .any(|e| matches!(e, Event::StepDetected { rounds: 1, .. })));
    assert!(run.accepted_a_step());
}

/// One stepped reply from each of a majority, then silence (or the others alone answering):
/// the same samples carried on are no persistence, so the step is never followed.
#[test]
fn a_step_is_confirmed_only_by_fresh_answers() {
    for others_answer in [false, true] {
        let mut run = five_honest();
        run.rounds(10);
        run.first_three_lie_by(2_000_000_000);
        for sim in &mut run.sims[3..] {
            sim.up = others_answer;
        }
        run.round();
        assert_eq!(run.state(), SyncState::Unsynchronized);
        for sim in &mut run.sims[..3] {
            sim.up = false;
        }
        // Until the stepped samples age out, and after.
        run.rounds(8);
        assert!(
            !run.accepted_a_step(),
            "others answering: {others_answer}: {:?}",
            run.events
        );
        let rounds: Vec<u32> = run
            .events
            .iter()
            .filter_map(|e| match e {
                Event::StepDetected { rounds, .. } => Some(*rounds),
                _ => None,
            })
            .collect();
        assert_eq!(rounds, [1], "others answering: {others_answer}");
    }
}

/// A source whose root distance exceeds the declared accuracy (an honest server that lost
/// its upstream hours ago) is kept out of the selection instead of widening the bound past
/// the accuracy, which stopped every token.
#[test]
fn a_source_too_far_to_vouch_for_the_accuracy_is_left_out() {
    let mut wide = honest(0);
    wide.root_dispersion = 2 * S;
    let config = DisciplineConfig {
        declared_accuracy_ns: Some(S),
        ..DisciplineConfig::default()
    };
    let sims = vec![honest(0), honest(100), honest(-100), honest(50), wide];
    let mut run = Run::with(sims, config, 0.0);
    run.rounds(6);
    let e = run.d.estimate(run.now);
    assert_eq!(e.state, SyncState::Synchronized, "{}", e.reason);
    assert!(e.bound_ns < S / 10, "bound {} ns", e.bound_ns);
    assert_eq!(run.selections()[4], Selection::TooFar);
    // Said once, as it is left out.
    let rejected: Vec<&Event> = run
        .events
        .iter()
        .filter(|e| matches!(e, Event::SourceRejected { source: 4, .. }))
        .collect();
    assert_eq!(
        rejected,
        [&Event::SourceRejected {
            source: 4,
            selection: Selection::TooFar
        }]
    );
}

/// An update that cannot select (one of the stepped sources off for a round) keeps the
/// pending step: an honest step with a flapping source is still confirmed.
#[test]
fn an_update_that_cannot_select_keeps_the_pending_step() {
    let mut run = Run::new(vec![honest(0), honest(100), honest(-100)]);
    run.rounds(10);
    // The sources all stepped (here the model is what was wrong).
    run.check = false;
    for sim in &mut run.sims {
        sim.lie = 2_000_000_000;
    }
    run.rounds(2);
    // One of them off by another second for a round: no majority.
    run.sims[2].lie = 3_000_000_000;
    run.round();
    assert!(
        run.d.estimate(run.now).reason.contains("agree"),
        "{}",
        run.d.estimate(run.now).reason
    );
    run.sims[2].lie = 2_000_000_000;
    run.rounds(2);
    assert!(run.accepted_a_step(), "{:?}", run.events);
}

/// Five honest servers and a GPS receiver too wide (400 ms) for the declared accuracy
/// (300 ms), after ten rounds: the receiver is left out of the selection.
fn five_honest_and_a_too_far_gps() -> Run {
    let mut wide_gps = gps(0);
    wide_gps.root_dispersion = 400_000_000;
    let config = DisciplineConfig {
        declared_accuracy_ns: Some(300_000_000),
        ..DisciplineConfig::default()
    };
    let sims = vec![
        honest(0),
        honest(100),
        honest(-100),
        honest(50),
        honest(-50),
        wide_gps,
    ];
    let mut run = Run::with(sims, config, 0.0);
    run.rounds(10);
    assert_eq!(run.selections()[5], Selection::TooFar);
    run
}

/// An independent reference too wide for the declared accuracy is left out of the selection
/// but still vetoes a step its interval rules out.
#[test]
fn a_too_far_independent_reference_still_vetoes_a_step() {
    let mut run = five_honest_and_a_too_far_gps();
    // Four of six configured: a majority.
    for sim in &mut run.sims[..4] {
        sim.lie = 2_000_000_000;
    }
    run.rounds(6);
    assert!(!run.accepted_a_step(), "{:?}", run.events);
    assert_eq!(run.state(), SyncState::Unsynchronized);
}

/// An independent reference too wide for the declared accuracy, which agrees with a real step
/// (it moved too), does not keep the rounds from confirming it: it contradicts nothing.
#[test]
fn a_too_far_independent_reference_that_agrees_lets_a_step_be_confirmed() {
    let mut run = five_honest_and_a_too_far_gps();
    run.truth.offset0 += 2_000_000_000;
    run.rounds(8);
    assert!(run.accepted_a_step(), "{:?}", run.events);
    assert_eq!(run.state(), SyncState::Synchronized);
}

/// A real step on a clock whose oscillator is 200 ppm off (a VM's, an uncalibrated crystal):
/// the offsets of the confirmation rounds move by the frequency the model knows, 3.2 ms a
/// poll, and the rounds still count as the same step.
#[test]
fn a_step_is_confirmed_on_a_fast_oscillator() {
    let mut run = Run::with(
        vec![
            honest(0),
            honest(100),
            honest(-100),
            honest(50),
            honest(-50),
        ],
        DisciplineConfig::default(),
        200e-6,
    );
    run.rounds(20);
    run.check = false;
    run.truth.offset0 += 2_000_000_000;
    run.rounds(8);
    assert!(run.accepted_a_step(), "{:?}", run.events);
    assert_eq!(run.state(), SyncState::Synchronized);
}

/// An independent reference among the survivors confirms a step at once, unless another one
/// that is reachable contradicts it.
#[test]
fn a_step_one_independent_reference_confirms_and_another_contradicts_waits() {
    let mut wide_nmea = gps(0);
    wide_nmea.root_dispersion = 150_000_000;
    let mut run = Run::new(vec![
        honest(0),
        honest(100),
        honest(-100),
        wide_nmea,
        honest(50),
        gps(0),
    ]);
    run.rounds(5);
    // The servers and the wide receiver step; the precise one stays.
    run.first_three_lie_by(2_000_000_000);
    run.sims[3].lie = 2_000_000_000;
    run.sims[4].lie = 2_000_000_000;
    run.check = false;
    run.round();
    assert!(!run.accepted_a_step(), "{:?}", run.events);
}

#[test]
fn a_step_that_goes_away_is_abandoned() {
    let mut run = five_honest();
    run.rounds(5);
    run.first_three_lie_by(2_000_000_000);
    run.rounds(2);
    assert_eq!(run.state(), SyncState::Unsynchronized);
    run.first_three_lie_by(0);
    // The samples of the lying rounds age out of the minimum-delay filter only slowly, but
    // the sources return to the truth: the step is abandoned.
    run.rounds(10);
    assert_eq!(run.state(), SyncState::Synchronized);
    assert!(run
        .events
        .iter()
        .any(|e| matches!(e, Event::StepAbandoned { .. })));
}

#[test]
fn an_independent_reference_decides_steps() {
    // GPS agrees with the stepped servers: accepted at once.
    let mut gps = honest(0);
    gps.independent = true;
    let mut run = Run::new(vec![
        honest(0),
        honest(100),
        honest(-100),
        gps.clone(),
        honest(50),
    ]);
    run.rounds(5);
    run.truth.offset0 += 2_000_000_000;
    run.round();
    assert_eq!(run.state(), SyncState::Synchronized);
    assert!(run.events.iter().any(|e| matches!(
        e,
        Event::StepAccepted {
            confirmed_by: "an independent reference",
            ..
        }
    )));

    // GPS disagrees with a majority of stepped servers: never followed by rounds alone.
    let mut run = Run::new(vec![honest(0), honest(100), honest(-100), gps, honest(50)]);
    run.rounds(5);
    run.first_three_lie_by(2_000_000_000);
    run.rounds(10);
    assert_eq!(run.state(), SyncState::Unsynchronized);
}

/// A GPS-like source: independent, and without leap-second information.
fn gps(bias_us: i64) -> Sim {
    Sim {
        independent: true,
        leap: Leap::Unknown,
        ..honest(bias_us)
    }
}

#[test]
fn an_independent_reference_that_keeps_disagreeing_stops_a_slowly_lying_majority() {
    // Three NTP servers under an attacker's control ramp away from UTC at 50 ppm: each update
    // stays within the bound of the last, so the step guard never fires. The GPS receiver
    // stays on UTC. Once its interval no longer meets the selected sources' combined interval
    // for a second update, no more stamps (the harness checks that the truth lies within the
    // bound whenever tokens may be issued).
    let mut run = Run::new(vec![honest(0), honest(100), honest(-100), gps(50)]);
    run.rounds(30);
    assert_eq!(run.state(), SyncState::Synchronized);
    run.events.clear();
    let start = run.now;
    let (mut first_disagreement, mut disputed_at) = (None, None);
    // Five and a half hours: 1 s of ramp.
    for round in 0..(5 * 3600 + 1800) / 16 {
        let lie = (50e-6 * (run.now + POLL - start) as f64) as i64;
        for sim in &mut run.sims[..3] {
            sim.lie = lie;
        }
        run.round();
        if run.d.dissent == 1 && first_disagreement.is_none() {
            // Tolerated once: still synchronized, on the model of the last agreeing update.
            first_disagreement = Some(round);
            assert_eq!(run.state(), SyncState::Synchronized);
        }
        let disputed = run
            .events
            .iter()
            .any(|e| matches!(e, Event::IndependentDisagrees { source: 3, .. }));
        if disputed && disputed_at.is_none() {
            disputed_at = Some(round);
        }
        if disputed_at.is_some() {
            let e = run.d.estimate(run.now);
            assert_eq!(e.state, SyncState::Unsynchronized, "round {round}");
            assert!(e.reason.contains("s3"), "{}", e.reason);
        }
    }
    // At the second disagreeing update, a few polls after the ramp's start (0.8 ms per poll
    // against intervals of about a millisecond).
    let disputed_at = disputed_at.expect("the GPS receiver's dissent was never told");
    assert_eq!(first_disagreement, Some(disputed_at - 1));
    assert!(disputed_at < 10, "disputed only at round {disputed_at}");
    assert_eq!(state_events(&run.events), ["lost"], "{:?}", run.events);

    // The attacker stops: the sources agree with the GPS receiver and the model again.
    run.first_three_lie_by(0);
    run.rounds(12);
    assert_eq!(run.state(), SyncState::Synchronized);
}

#[test]
fn honest_independent_references_raise_no_false_alarm() {
    // Three NTP servers and a GPS receiver, all honest, their errors spread within their
    // distances; the oscillator drifts by 10 ppm. Over eight hours, never a dissent. The same
    // with a serial receiver whose interval is wide and off-centre.
    let serial = Sim {
        bias: -300_000_000,
        jitter: 20_000_000,
        precision: 350_000_000,
        ..gps(0)
    };
    for receiver in [gps(-500), gps(500), serial] {
        let sims = vec![honest(400), honest(-400), honest(0), receiver];
        let mut run = Run::with(sims, DisciplineConfig::default(), 10e-6);
        run.round();
        for round in 0..8 * 3600 / 16 {
            run.round();
            assert_eq!(
                run.state(),
                SyncState::Synchronized,
                "round {round}: {}",
                run.d.estimate(run.now).reason
            );
        }
        assert!(!run
            .events
            .iter()
            .any(|e| matches!(e, Event::IndependentDisagrees { .. })));
    }
}

/// Moves the run's truth to `before` UTC seconds ahead of the midnight that ends December
/// (leaps are accepted only at the end of June or December), with an inserted leap there if
/// `inserted`; returns the leap's UTC.
fn before_new_year(run: &mut Run, before: u64, inserted: bool) -> u64 {
    let leap = end_of_month(run.truth.utc(T0) + 20 * 86_400 * S);
    run.truth.offset0 += (leap - before * S) as i64 - run.truth.utc(T0) as i64;
    run.truth.leap_at_utc = inserted.then_some(leap);
    leap
}

/// The leap announced by `sims` (the informing ones say Insert) is scheduled, refused from
/// 23:59:59 until an update after it confirms it, applied, and survives the announcement's
/// withdrawal.
fn a_leap_second_is_refused_around_midnight_and_applied_with(sims: Vec<Sim>) {
    let mut run = Run::new(sims);
    // Start 100 s before the end of the year.
    let leap = before_new_year(&mut run, 100, true);
    run.round();
    assert!(
        run.events.iter().any(|e| matches!(
            e,
            Event::LeapScheduled {
                kind: Leap::Insert,
                ..
            }
        )),
        "{:?}",
        run.events
    );
    // Walk across the leap in 250 ms steps between polls: refused from the window on, and
    // after it until an update confirms the leap (none comes in this walk).
    let mut t = run.now;
    let mut refused = 0;
    while run.truth.utc(t) < leap + 3 * S {
        let e = run.d.estimate(t);
        let true_utc = run.truth.utc(t);
        let in_window = true_utc + S >= leap;
        // Around the leap the truth jumps back: both readings of 23:59:59.x are in the window.
        if in_window || e.utc_ns + S >= leap {
            assert_eq!(e.state, SyncState::Unsynchronized, "at utc {true_utc}");
            refused += 1;
        } else {
            assert_ne!(e.state, SyncState::Unsynchronized, "at utc {true_utc}");
            assert!((e.utc_ns as i64 - true_utc as i64).unsigned_abs() <= e.bound_ns);
        }
        t += S / 4;
    }
    assert!(refused >= 16, "refused {refused} times");
    // Polls across the leap, the sources still announcing it, then withdrawing it.
    while run.now < leap - run.truth.offset(run.now) as u64 + 2 * POLL {
        run.round();
    }
    assert!(run.events.iter().any(|e| matches!(
        e,
        Event::LeapApplied {
            kind: Leap::Insert,
            ..
        }
    )));
    for sim in &mut run.sims {
        if sim.leap == Leap::Insert {
            sim.leap = Leap::None;
        }
    }
    run.rounds(3);
    assert_eq!(run.state(), SyncState::Synchronized);
    let e = run.d.estimate(run.now);
    assert!((e.utc_ns as i64 - run.truth.utc(run.now) as i64).unsigned_abs() < 5_000_000);
}

#[test]
fn a_leap_second_is_refused_around_midnight_and_applied() {
    let mut sims = vec![honest(0), honest(10), honest(-10)];
    for sim in &mut sims {
        sim.leap = Leap::Insert;
    }
    a_leap_second_is_refused_around_midnight_and_applied_with(sims);
}

#[test]
fn a_leap_is_applied_once_when_an_update_falls_in_the_repeated_second() {
    let mut sims = vec![honest(0), honest(10), honest(-10)];
    for sim in &mut sims {
        sim.leap = Leap::Insert;
    }
    let mut run = Run::new(sims);
    // The sixth update comes half a second into the inserted second (23:59:59 again), when
    // every sample of that round is on the new scale.
    let leap = before_new_year(&mut run, 6 * POLL / S, true);
    run.truth.offset0 += (S / 2) as i64;
    // `round` checks the truth against the bound after each update and half a poll later.
    run.rounds(10);
    let applied = run
        .events
        .iter()
        .filter(|e| {
            matches!(
                e,
                Event::LeapApplied {
                    kind: Leap::Insert,
                    ..
                }
            )
        })
        .count();
    assert_eq!(applied, 1, "{:?}", run.events);
    assert!(
        !run.events
            .iter()
            .any(|e| matches!(e, Event::StepDetected { .. } | Event::StepAccepted { .. })),
        "the leap was taken for a step: {:?}",
        run.events
    );
    assert_eq!(run.state(), SyncState::Synchronized);
    let e = run.d.estimate(run.now);
    assert!(run.truth.utc(run.now) > leap);
    assert!((e.utc_ns as i64 - run.truth.utc(run.now) as i64).unsigned_abs() < 5_000_000);
}

#[test]
fn sources_without_leap_information_abstain() {
    // Two NTP servers announce the leap; two GPS receivers know nothing of it.
    let mut ntp = honest(0);
    ntp.leap = Leap::Insert;
    a_leap_second_is_refused_around_midnight_and_applied_with(vec![
        ntp.clone(),
        ntp,
        gps(10),
        gps(-10),
    ]);
}

#[test]
fn a_leap_stays_scheduled_when_its_only_announcer_goes_away() {
    let mut ntp = honest(0);
    ntp.leap = Leap::Insert;
    let mut run = Run::new(vec![ntp, gps(10), gps(-10), gps(20)]);
    let leap = before_new_year(&mut run, 200, true);
    run.round();
    assert!(run.d.system_view(run.now).leap.is_some());
    run.sims[0].up = false;
    while run.now < leap - run.truth.offset(run.now) as u64 + 2 * POLL {
        run.round();
    }
    assert!(run.events.iter().any(|e| matches!(
        e,
        Event::LeapApplied {
            kind: Leap::Insert,
            ..
        }
    )));
    assert_eq!(run.state(), SyncState::Synchronized);
}

#[test]
fn a_leap_applied_on_the_announcement_alone_gives_no_stamps_until_an_update_confirms_it() {
    // The three servers announce a leap that does not happen, and become unreachable before
    // midnight (the network is down across it): the clock holds over, and at midnight applies
    // the leap on the announcement. Holding over on that model would stamp a second off with
    // a bound of milliseconds (`round` checks the truth against the bound whenever stamps are
    // allowed); with a source left, it would contradict the model (refused before too).
    let mut sims = vec![honest(0), honest(10), honest(-10)];
    for sim in &mut sims {
        sim.leap = Leap::Insert;
    }
    let mut run = Run::new(sims);
    let leap = before_new_year(&mut run, 300, false);
    run.rounds(2);
    assert!(run.d.system_view(run.now).leap.is_some());
    for sim in &mut run.sims {
        sim.up = false;
    }
    // Their samples age out: holdover, before midnight.
    for _ in 0..8 {
        run.round();
    }
    assert_eq!(run.state(), SyncState::Holdover);
    assert!(run.truth.utc(run.now) < leap);
    // Between polls too: past the leap the prediction shifts the model before any update
    // applies the leap; no stamp on it either.
    let mut t = run.now;
    while run.truth.utc(t) < leap + 2 * POLL {
        run.check_truth(t);
        t += S / 4;
    }
    while run.now < leap - run.truth.offset(run.now) as u64 + 4 * POLL {
        run.round();
    }
    assert!(run.events.iter().any(|e| matches!(
        e,
        Event::LeapApplied {
            kind: Leap::Insert,
            ..
        }
    )));
    let e = run.d.estimate(run.now);
    assert_eq!(e.state, SyncState::Unsynchronized);
    assert!(
        e.reason.contains("until an update confirms"),
        "{}",
        e.reason
    );
    // The sources are back, a second off the model: followed once the step is confirmed.
    for sim in &mut run.sims {
        sim.up = true;
        sim.leap = Leap::None;
    }
    for _ in 0..20 {
        run.round();
        if run.state() == SyncState::Synchronized {
            break;
        }
    }
    assert_eq!(run.state(), SyncState::Synchronized);
    let e = run.d.estimate(run.now);
    assert!((e.utc_ns as i64 - run.truth.utc(run.now) as i64).unsigned_abs() < 5_000_000);
}

/// A leap scheduled, then no longer announced by the sources before it happened: withdrawn,
/// and said so.
#[test]
fn a_leap_withdrawn_before_it_happened_is_an_event() {
    let mut sims = vec![honest(0), honest(10), honest(-10)];
    for sim in &mut sims {
        sim.leap = Leap::Insert;
    }
    let mut run = Run::new(sims);
    let leap = before_new_year(&mut run, 3_600, false);
    run.round();
    assert!(run.d.system_view(run.now).leap.is_some());
    for sim in &mut run.sims {
        sim.leap = Leap::None;
    }
    run.round();
    assert_eq!(run.d.system_view(run.now).leap, None);
    assert!(
        run.events.contains(&Event::LeapWithdrawn {
            kind: Leap::Insert,
            utc_ns: leap
        }),
        "{:?}",
        run.events
    );
}

#[test]
fn a_leap_is_accepted_only_at_the_end_of_june_or_december() {
    // 2026-11-19: the end of November is no leap date.
    let mut run = Run::new(vec![honest(0), honest(10), honest(-10)]);
    for sim in &mut run.sims {
        sim.leap = Leap::Insert;
    }
    run.rounds(3);
    assert_eq!(run.d.system_view(run.now).leap, None);
    assert!(!run
        .events
        .iter()
        .any(|e| matches!(e, Event::LeapScheduled { .. })));
}

#[test]
fn disagreeing_announcements_on_the_last_day_refuse_around_midnight() {
    // One server announces a leap, another does not, the GPS receivers cannot tell: the clock
    // does not guess. Stamps stop at 23:59:59 and resume only after an update past midnight
    // has seen which way the sources went (here: no leap happened).
    let mut ntp = honest(0);
    ntp.leap = Leap::Insert;
    let mut run = Run::new(vec![ntp, honest(10), gps(-10), gps(20)]);
    let leap = before_new_year(&mut run, 3_600, false);
    run.rounds(2);
    assert_eq!(run.state(), SyncState::Synchronized);
    assert_eq!(run.d.system_view(run.now).leap, None);
    let mut t = run.now;
    let mut resolved = false;
    while run.truth.utc(t) < leap + 3 * POLL {
        if t >= run.now + POLL {
            run.round();
            resolved |= run.truth.utc(run.now) >= leap + S;
        }
        let utc = run.truth.utc(t);
        let e = run.d.estimate(t);
        if utc + S >= leap && !resolved {
            assert_eq!(e.state, SyncState::Unsynchronized, "at {utc}");
        } else {
            assert_eq!(e.state, SyncState::Synchronized, "at {utc}: {}", e.reason);
        }
        t += S / 4;
    }
    assert_eq!(run.state(), SyncState::Synchronized);
}

#[test]
fn an_uncertain_leap_is_not_settled_by_samples_from_before_midnight() {
    // Two servers announce the leap, two do not (smearing ones, say), and it is inserted. The
    // first update after midnight finds only answers from before it, still fresh: they agree
    // with the unshifted model and say nothing of the leap. They must not settle the
    // uncertainty (the clock would stamp a second ahead of UTC with a bound of milliseconds).
    let mut announcing = honest(0);
    announcing.leap = Leap::Insert;
    let mut run = Run::new(vec![
        announcing.clone(),
        announcing,
        honest(10),
        honest(-10),
    ]);
    let leap = before_new_year(&mut run, 10 * POLL / S, true);
    run.rounds(2);
    assert_eq!(run.state(), SyncState::Synchronized);
    // Answers 2 s before midnight, then an update 1.5 s after it (true UTC).
    while run.truth.utc(run.now + POLL) + 2 * S < leap {
        run.round();
    }
    run.now = leap - 2 * S - run.truth.offset(run.now) as u64;
    run.answer();
    run.d.update(run.now);
    run.now += 4 * S + S / 2;
    assert_eq!(run.truth.utc(run.now), leap + S + S / 2);
    run.d.update(run.now);
    run.events.extend(run.d.drain_events());
    let e = run.d.estimate(run.now);
    assert_eq!(e.state, SyncState::Unsynchronized, "{}", e.reason);
    run.check_truth(run.now);
    // Answers from after midnight decide, as a step back the sources confirm; the truth
    // stays within the bound all along (`round` checks it).
    run.rounds(12);
    assert_eq!(run.state(), SyncState::Synchronized);
    let e = run.d.estimate(run.now);
    assert!((e.utc_ns as i64 - run.truth.utc(run.now) as i64).unsigned_abs() < 5_000_000);
}

/// `sims` with the lineages given: (own address, upstream) per source.
fn with_lineage(mut sims: Vec<Sim>, lineage: &[(Option<u8>, Option<u8>)]) -> Vec<Sim> {
    for (sim, (address, upstream)) in sims.iter_mut().zip(lineage) {
        sim.lineage = Lineage {
            address: address.map(|a| [192, 0, 2, a]),
            upstream: upstream.map(|u| [192, 0, 2, u]),
        };
    }
    sims
}

#[test]
fn sources_that_take_their_time_from_one_server_count_once() {
    // Five servers, two of them synchronized to the first (their reference ID is its
    // address), and the three 50 ms off together: three of five agree, but they are one
    // source, and the two honest ones are no majority either. Nothing is selected (the
    // truth would otherwise leave the bound: `round` checks it).
    let lineage = [
        (Some(1), Some(100)),
        (Some(2), Some(1)),
        (Some(3), Some(1)),
        (Some(4), Some(101)),
        (Some(5), Some(102)),
    ];
    let sims = vec![liar(50), liar(50), liar(50), honest(0), honest(10)];
    let mut run = Run::new(with_lineage(sims.clone(), &lineage));
    run.rounds(6);
    assert_eq!(run.state(), SyncState::Unsynchronized);
    assert!(
        run.d
            .estimate(run.now)
            .reason
            .contains("2 more take their time"),
        "{}",
        run.d.estimate(run.now).reason
    );
    let dependent = |run: &Run| -> Vec<(usize, Vec<usize>)> {
        run.events
            .iter()
            .filter_map(|e| match e {
                Event::SourceDependent { source, with } => Some((*source, with.clone())),
                _ => None,
            })
            .collect()
    };
    assert_eq!(
        dependent(&run),
        [(0, vec![1, 2]), (1, vec![0, 2]), (2, vec![0, 1])],
        "told once each"
    );

    // The same with the three synchronized to one server that is not configured.
    let shared = [
        (Some(1), Some(100)),
        (Some(2), Some(100)),
        (Some(3), Some(100)),
        (Some(4), Some(101)),
        (Some(5), Some(102)),
    ];
    let mut run = Run::new(with_lineage(sims, &shared));
    run.rounds(6);
    assert_eq!(run.state(), SyncState::Unsynchronized);

    // Honest, the three count as one and the other two make the majority. When the two
    // take their time elsewhere, they count on their own again.
    let mut run = Run::new(with_lineage(
        vec![honest(0), honest(10), honest(-10), honest(20), honest(-20)],
        &lineage,
    ));
    run.rounds(3);
    assert_eq!(run.state(), SyncState::Synchronized);
    // One of the others lost: two votes of the three needed, too few to select, so the
    // clock holds over (as when as many independent servers are lost).
    run.sims[3].up = false;
    run.rounds(8);
    let e = run.d.estimate(run.now);
    assert_eq!(e.state, SyncState::Holdover, "{}", e.reason);
    assert!(
        e.reason.contains("usable sources: 2 (2 more"),
        "{}",
        e.reason
    );
    run.sims = with_lineage(
        run.sims.clone(),
        &[(Some(1), None), (Some(2), Some(103)), (Some(3), Some(104))],
    );
    run.rounds(2);
    assert_eq!(
        dependent(&run)[3..],
        [(0, vec![]), (1, vec![]), (2, vec![])],
        "independent again"
    );
    assert_eq!(run.state(), SyncState::Synchronized);
}

/// Reference IDs that name no server group nothing: a reference clock's name at stratum 2,
/// chrony's `local` (127.127.1.1), `0.0.0.0`; a private address groups only with the
/// configured server that has it, not with another source naming it.
#[test]
fn reference_ids_that_name_no_server_group_nothing() {
    for id in [
        *b"LOCL",
        *b"GPS\0",
        *b"PHC0",
        [127, 127, 1, 1],
        [0, 0, 0, 0],
    ] {
        assert!(!names_a_server(id), "{id:?}");
    }
    for id in [[192, 0, 2, 1], [10, 1, 2, 3], [203, 0, 113, 9], *b"gps\0"] {
        assert!(names_a_server(id), "{id:?}");
    }
    assert!(private([10, 1, 2, 3]) && private([172, 20, 0, 1]) && private([100, 64, 0, 1]));
    assert!(!private([172, 32, 0, 1]) && !private([192, 0, 2, 1]));

    let mut sims = vec![honest(0), honest(10), honest(-10), honest(20), honest(-20)];
    for sim in &mut sims[..4] {
        sim.lineage.upstream = Some([127, 127, 1, 1]);
    }
    sims[4].lineage.upstream = Some(*b"LOCL");
    let mut run = Run::new(sims);
    run.rounds(3);
    assert_eq!(run.state(), SyncState::Synchronized);
    assert!(!run
        .events
        .iter()
        .any(|e| matches!(e, Event::SourceDependent { .. })));
    // Three sharing a private upstream: not grouped; one naming a configured server's
    // private address: grouped with it.
    let mut sims = vec![honest(0), honest(10), honest(-10), honest(20), honest(-20)];
    for sim in &mut sims[..3] {
        sim.lineage.upstream = Some([10, 0, 0, 1]);
    }
    sims[3].lineage.address = Some([10, 9, 9, 9]);
    sims[4].lineage.upstream = Some([10, 9, 9, 9]);
    let mut run = Run::new(sims);
    run.rounds(3);
    assert_eq!(run.selections().len(), 5);
    let dependent: Vec<&Event> = run
        .events
        .iter()
        .filter(|e| matches!(e, Event::SourceDependent { .. }))
        .collect();
    assert_eq!(
        dependent,
        [
            &Event::SourceDependent {
                source: 3,
                with: vec![4]
            },
            &Event::SourceDependent {
                source: 4,
                with: vec![3]
            }
        ]
    );
}

/// The sources' time can be a little ahead of the model's: an update past midnight + 1 s by
/// theirs and not yet by the model's must not settle the uncertainty (its samples from before
/// midnight are still there).
#[test]
fn an_uncertain_leap_is_settled_only_after_its_samples_were_dropped() {
    let mut d = Discipline::new(DisciplineConfig::default(), Vec::new());
    let midnight = 1_798_761_600 * S; // 2027-01-01T00:00:00Z
    d.leap_uncertain = Some(midnight);
    let survivors: [Interval; 0] = [];
    // At midnight + 1.002 s by the sources; the samples not cut yet.
    d.vote_leap(&survivors, midnight, (S + 2_000_000) as i64);
    assert_eq!(d.leap_uncertain, Some(midnight));
    d.uncertain_cut = Some(midnight);
    d.vote_leap(&survivors, midnight, (S + 2_000_000) as i64);
    assert_eq!(d.leap_uncertain, None);
}

#[test]
fn a_source_claiming_an_absurd_distance_cannot_outvote_honest_ones() {
    // An NTP server with precision 34 (2^34 s, as the adapter would have turned it), and one
    // whose precision alone is just below i64::MAX: neither may invert its interval or
    // overflow the arithmetic, and three honest sources of four stay a majority.
    for precision in [(2f64.powi(34) * 1e9) as u64, i64::MAX as u64 - 1, u64::MAX] {
        let mut absurd = honest(0);
        absurd.precision = precision;
        let mut run = Run::new(vec![honest(0), honest(100), honest(-100), absurd]);
        for _ in 0..5 {
            run.round();
            assert_eq!(
                run.state(),
                SyncState::Synchronized,
                "{}",
                run.d.estimate(run.now).reason
            );
            let sel = run.selections();
            assert!(
                sel[..3].iter().all(|s| *s == Selection::Selected),
                "{sel:?}"
            );
            assert!(
                matches!(sel[3], Selection::Unusable | Selection::Falseticker),
                "{sel:?}"
            );
        }
    }
}

#[test]
fn extreme_offsets_neither_overflow_nor_count() {
    // A PPS report dated near the end of i64 nanoseconds, then one near zero, from the same
    // source: no arithmetic overflow, and the source is not usable.
    let specs = (0..4)
        .map(|i| SourceSpec {
            name: format!("s{i}"),
            independent: i == 3,
        })
        .collect();
    let mut d = Discipline::new(DisciplineConfig::default(), specs);
    let mut now = T0;
    for round in 0..4 {
        now += POLL;
        for i in 0..3 {
            d.sample(
                i,
                Sample {
                    at: now,
                    offset: 1_000_000,
                    delay: 400_000,
                    root_delay: 0,
                    root_dispersion: 600_000,
                    precision: 1_000,
                    leap: Leap::None,
                    lineage: Lineage::default(),
                },
            );
        }
        let extreme = if round % 2 == 0 {
            i64::MAX
        } else {
            i64::MIN + 1
        };
        d.sample(
            3,
            Sample {
                at: now,
                offset: extreme,
                delay: 0,
                root_delay: 0,
                root_dispersion: 0,
                precision: 1_000_000,
                leap: Leap::None,
                lineage: Lineage::default(),
            },
        );
        d.update(now);
        assert_eq!(d.estimate(now).state, SyncState::Synchronized);
    }
    assert_eq!(d.source_views(now)[3].selection, Selection::Unusable);
}

#[test]
fn a_frequency_fitted_over_one_poll_does_not_break_the_bound() {
    // Three sources, each 10 ms wide, read 9 ms early and then 9 ms late: the two updates are
    // consistent (18 ms apart, within both bounds), and a line through them runs at
    // 18 ms / 16 s = 1125 ppm. Extrapolating with that slope while the bound grows at 15 ppm
    // would leave the truth behind within half a poll.
    let wide = |bias_ms: i64| Sim {
        bias: bias_ms * 1_000_000,
        jitter: 0,
        root_dispersion: 10_000_000,
        ..honest(0)
    };
    let mut run = Run::new(vec![wide(-9), wide(-9), wide(-9)]);
    run.round();
    run.sims = vec![wide(9), wide(9), wide(9)];
    run.round();
    assert_eq!(run.state(), SyncState::Synchronized);
    // The bound holds over a whole poll without updates, and in holdover.
    for k in 1..=64 {
        run.check_truth(run.now + k * POLL / 4);
    }
    run.rounds(20);
    let view = run.d.system_view(run.now);
    assert!(view.frequency_ppm.unwrap().abs() < 500.0, "{view:?}");
}

#[test]
fn samples_are_carried_to_the_update_at_the_model_frequency() {
    // The oscillator is 200 ppm off; one source answers only every fourth poll, so its sample
    // is up to three polls old at an update: advanced at the model's frequency it stays
    // consistent with the others instead of lagging by 200 ppm × 48 s ≈ 10 ms.
    let sims = vec![honest(0), honest(100), honest(-100), honest(50)];
    let mut run = Run::with(sims, DisciplineConfig::default(), 200e-6);
    run.rounds(20);
    for round in 0..40 {
        run.sims[3].up = round % 4 == 0;
        run.round();
        assert_eq!(run.state(), SyncState::Synchronized, "round {round}");
        assert_eq!(run.selections()[3], Selection::Selected, "round {round}");
    }
}

/// The state events (sync, holdover, loss of sync, accuracy) among `events`, in order.
fn state_events(events: &[Event]) -> Vec<&'static str> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Changed(Change::Synchronized { .. }) => Some("sync"),
            Event::Changed(Change::Unsynchronized { .. }) => Some("lost"),
            Event::Changed(Change::Holdover { .. }) => Some("holdover"),
            Event::Changed(Change::AccuracyExceeded { .. }) => Some("exceeded"),
            Event::Changed(Change::AccuracyRegained { .. }) => Some("regained"),
            _ => None,
        })
        .collect()
}

#[test]
fn every_loss_and_return_of_sync_is_an_event() {
    let mut run = Run::new(vec![honest(0), honest(50), honest(-50)]);
    run.rounds(5);
    assert_eq!(state_events(&run.events), ["sync"]);
    // Two of three lie: no majority, sync lost; they come back: sync regained.
    run.sims[1].lie = 3 * S as i64;
    run.sims[2].lie = 3 * S as i64;
    run.rounds(3);
    assert_eq!(run.state(), SyncState::Unsynchronized);
    run.sims[1].lie = 0;
    run.sims[2].lie = 0;
    run.rounds(12);
    assert_eq!(run.state(), SyncState::Synchronized);
    assert_eq!(state_events(&run.events), ["sync", "lost", "sync"]);
}

#[test]
fn transitions_between_updates_are_events_once() {
    // Declared accuracy 5 ms: the bound passes it in holdover, which stops issuing.
    let config = DisciplineConfig {
        declared_accuracy_ns: Some(5_000_000),
        ..DisciplineConfig::default()
    };
    let sims = vec![honest(0), honest(50), honest(-50)];
    let mut run = Run::with(sims, config, 0.0);
    run.rounds(20);
    run.events.clear();
    // No update at all: silence past the sample age limit is holdover, seen by `observe` at
    // the time `next_change` names, and said once.
    let mut t = run.now;
    let mut seen = Vec::new();
    let mut exceeded_at = None;
    for _ in 0..10 {
        let Some(next) = run.d.next_change(t) else {
            break;
        };
        assert!(next > t);
        t = next;
        run.d.observe(t);
        let events = run.d.drain_events();
        assert!(!events.is_empty(), "nothing changed at {t}");
        if events
            .iter()
            .any(|e| matches!(e, Event::Changed(Change::AccuracyExceeded { .. })))
        {
            exceeded_at = Some(t);
        }
        seen.extend(events);
        run.d.observe(t);
        assert!(run.d.drain_events().is_empty());
    }
    let mut kinds = state_events(&seen);
    kinds.sort_unstable();
    assert_eq!(kinds, ["exceeded", "holdover"]);
    // Told within a millisecond of the crossing.
    let exceeded_at = exceeded_at.unwrap();
    assert!(run.d.estimate(exceeded_at).bound_ns > 5_000_000);
    assert!(run.d.estimate(exceeded_at - 1_000_000).bound_ns <= 5_000_000);
    // Sources back: synchronized and within the accuracy again.
    run.now = t;
    run.rounds(3);
    assert_eq!(state_events(&run.events), ["sync", "regained"]);
}

#[test]
fn touching_intervals_agree_and_ties_prefer_none() {
    // Two groups of two that do not overlap each other, plus nothing else: no majority.
    let mut run = Run::new(vec![honest(0), honest(10), liar(2_000), liar(2_000)]);
    run.rounds(3);
    assert_eq!(run.state(), SyncState::Unsynchronized);
}

#[test]
fn end_of_month_is_the_next_first_of_month() {
    let nov_26 = 1_795_000_000 * S; // 2026-11-19
    let dec_1 = NaiveDate::from_ymd_opt(2026, 12, 1)
        .unwrap()
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc()
        .timestamp() as u64
        * S;
    assert_eq!(end_of_month(nov_26), dec_1);
    let dec_31 = dec_1 + 30 * 86_400 * S + 3_600 * S;
    let jan_1 = NaiveDate::from_ymd_opt(2027, 1, 1)
        .unwrap()
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc()
        .timestamp() as u64
        * S;
    assert_eq!(end_of_month(dec_31), jan_1);
}

#[test]
fn a_suspend_voids_the_model_and_the_samples_measured_before_it() {
    let mut run = Run::new(vec![honest(100), honest(-200), honest(0)]);
    run.rounds(8);
    assert_eq!(run.state(), SyncState::Synchronized);
    run.events.clear();
    // An hour asleep: the local clock stood still while UTC went on. A poll answered just
    // before the suspend is delivered after it, and an exchange that spanned the suspend is
    // dated just after the restart (the local clock stood still): both carry the old offset.
    let stale_at = run.now + POLL / 2;
    let stale_offset = run.truth.offset(stale_at);
    run.now += POLL / 2 + S;
    let spanning_at = run.now + S / 2;
    run.truth.offset0 += 3_600 * S as i64;
    run.d
        .restart(run.now + 2 * S, "the host was suspended for 3600 s".into());
    run.d.observe(run.now);
    let events = run.d.drain_events();
    assert!(
        events.iter().any(|e| matches!(e,
            Event::Changed(Change::Unsynchronized { reason }) if reason.contains("suspended"))),
        "{events:?}"
    );
    assert_eq!(run.state(), SyncState::Unsynchronized);
    for (source, at) in (0..3).flat_map(|s| [(s, stale_at), (s, spanning_at)]) {
        run.d.sample(
            source,
            Sample {
                at,
                offset: stale_offset,
                delay: 400_000,
                root_delay: 0,
                root_dispersion: 600_000,
                precision: 1_000,
                leap: Leap::None,
                lineage: Lineage::default(),
            },
        );
    }
    run.now += S;
    run.d.update(run.now);
    assert_eq!(
        run.state(),
        SyncState::Unsynchronized,
        "synchronized on samples from before the suspend: {:?}",
        run.d.estimate(run.now)
    );
    // New samples synchronize it again, on the new offset (each round checks the truth lies
    // within the bound).
    run.rounds(4);
    assert_eq!(run.state(), SyncState::Synchronized);
    let e = run.d.estimate(run.now);
    assert!(
        e.utc_ns.abs_diff(run.truth.utc(run.now)) < 5_000_000,
        "{e:?}"
    );
}
