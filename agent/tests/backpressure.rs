//! Backpressure from the pipeline to the MQTT ingest: while the queue to the journal is full,
//! the connection stops reading (the broker keeps the messages), memory does not grow, and
//! nothing is lost once the queue drains. Real broker (embedded, or `EDGEWISE_TEST_MQTT_URL`).

mod common;

use std::time::Duration;

#[tokio::test]
async fn a_full_queue_stops_reading_from_the_broker_and_loses_nothing() {
    const QUEUE: usize = 4;
    const MESSAGES: usize = 60;
    let setup = common::Setup::new();
    let cfg = setup.agent_config(common::free_addr());
    let (connection, mut rx) = common::Listening::start(&cfg, QUEUE).await;

    // Published (and acked by the broker) while nothing drains the queue.
    let sent: Vec<(String, Vec<u8>)> = (0..MESSAGES)
        .map(|i| {
            let payload = common::temperature("n1", 1_000 + i as i64, 20.0);
            (setup.topic("n1"), payload)
        })
        .collect();
    common::publish_all(&setup.broker, &sent).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The queue is full and holds no more than its capacity: the rest waits at the broker.
    assert_eq!(rx.len(), QUEUE);

    // Draining (and acking, as the pipeline does after its commit) lets everything through, in
    // order, once.
    let mut got = Vec::new();
    while got.len() < MESSAGES {
        let p = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("the connection resumed reading")
            .expect("the connection is running")
            .message;
        connection.client.ack(&p).await.unwrap();
        assert!(rx.len() <= QUEUE);
        got.push(p.payload.to_vec());
    }
    let want: Vec<Vec<u8>> = sent.into_iter().map(|(_, p)| p).collect();
    assert_eq!(got, want);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(rx.is_empty(), "nothing is delivered twice");

    connection.stop().await;
}
