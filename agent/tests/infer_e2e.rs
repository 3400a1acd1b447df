//! End to end with inference: a real broker, the agent with the shipped anomaly model, a real
//! receiver. An injected spike is flagged at the cloud; a quiet window is scored and not flagged.
//! Scoring happens in `Pipeline::close_due`, configured by `[inference]` in `AgentConfig`.

mod common;

use common::*;
use edgewise_agent::infer::{InferenceConfig, Scorer};
use edgewise_agent::{Agent, AgentConfig};

/// Aligned to a 10 s window boundary.
const T0: i64 = 1_700_000_000_000;

fn model_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/anomaly/anomaly.onnx")
}

/// `Setup::agent_config` plus an `[inference]` table running the anomaly model with its defaults.
fn config_with_inference(setup: &Setup, cloud: std::net::SocketAddr) -> AgentConfig {
    let mut cfg = setup.agent_config(cloud);
    cfg.inference = Some(edgewise_agent::infer::InferenceConfig {
        model_path: model_path(),
        streams: vec!["+/temperature".into()],
        ..Default::default()
    });
    assert_eq!(cfg.problems(), vec![]);
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injected_spike_is_flagged_at_the_cloud() {
    let setup = Setup::new();
    let receiver = setup.cloud.start(free_addr()).await;
    let agent = Agent::start(config_with_inference(&setup, receiver.local_addr()))
        .await
        .unwrap();
    subscribed(&agent).await;

    // Ten readings per node in one window: 22 +- 0.3 Cel; n2 has a 70 Cel spike in the middle
    // (inside the contract's range, so only the model can tell).
    let mut messages = Vec::new();
    for node in ["quiet", "spiky"] {
        for i in 0..10i64 {
            let wobble = [0.0, 0.2, -0.1, 0.3, -0.3, 0.1, 0.0, -0.2, 0.2, -0.1][i as usize];
            let v = if node == "spiky" && i == 5 {
                70.0
            } else {
                22.0 + wobble
            };
            messages.push((setup.topic(node), temperature(node, T0 + i * 1000, v)));
        }
    }
    publish_all(&setup.broker, &messages).await;
    let m = agent.metrics().clone();
    wait_until(20, "2 summaries synced", || m.summaries_synced.get() == 2).await;
    agent.stop().await;

    let stored = setup.cloud.stored();
    assert_eq!(stored.len(), 2);
    let scorer_cfg = InferenceConfig {
        model_path: model_path(),
        watch_interval_ms: 0,
        ..InferenceConfig::default()
    };
    let mut scorer = Scorer::load(&scorer_cfg).unwrap();
    for s in &stored {
        let score = s
            .summary
            .score
            .as_ref()
            .expect("every temperature window is scored");
        assert_eq!(
            score.model,
            scorer.model_id(),
            "name@content hash of the shipped file"
        );
        let spiky = s.summary.stream == "spiky/temperature";
        assert_eq!(score.alert, spiky, "{}: {score:?}", s.summary.stream);
        assert_eq!(s.summary.is_alert(), spiky);
        // The cloud holds exactly what the model computes for that summary.
        let mut again = vec![s.summary.clone()];
        again[0].score = None;
        scorer.score(&mut again);
        let expected = again[0].score.as_ref().unwrap().value;
        assert!(
            (score.value - expected).abs() < 1e-6,
            "{} vs {expected}",
            score.value
        );
    }
}
