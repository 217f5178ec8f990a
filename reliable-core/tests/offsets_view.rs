//! The read-only view of an offset tracker (issue 14, item 6): it reports each partition's
//! commit position, unfinished offsets and last committed position, and has no way to change
//! them. That it cannot change them is a compile-time guarantee: `OffsetsView` has only `&self`
//! accessors (see the `compile_fail` example in its rustdoc).

use reliable_core::offsets::{OffsetTracker, OffsetsView, PartitionOffsets};
use reliable_core::TopicPartition;

#[test]
fn the_view_reports_watermark_unfinished_and_committed_per_partition() {
    let tracker = OffsetTracker::new();
    let a = TopicPartition::new("orders", 0);
    let b = TopicPartition::new("orders", 1);
    for offset in [10, 11, 12] {
        tracker.track(&a, offset);
    }
    tracker.track(&b, 7);
    tracker.complete(&a, 11).unwrap();
    tracker.complete(&b, 7).unwrap();
    tracker.mark_committed(&b, 8);

    let view: OffsetsView<'_> = tracker.view();
    assert_eq!(view.committable(&a), Some(10));
    assert_eq!(view.unfinished(&a), vec![10, 12]);
    assert_eq!(view.committed(&a), None);
    assert_eq!(view.committable(&b), Some(8));
    assert!(view.unfinished(&b).is_empty());
    assert_eq!(view.committed(&b), Some(8));

    let unknown = TopicPartition::new("orders", 9);
    assert_eq!(view.committable(&unknown), None);
    assert!(view.unfinished(&unknown).is_empty());

    let all = view.partitions();
    assert_eq!(all.len(), 2);
    assert_eq!(
        (
            &all[0].partition,
            all[0].committable,
            all[0].unfinished,
            all[0].committed
        ),
        (&a, Some(10), 2, None)
    );
    assert_eq!(
        (
            &all[1].partition,
            all[1].committable,
            all[1].unfinished,
            all[1].committed
        ),
        (&b, Some(8), 0, Some(8))
    );

    // The view is live: it reads the tracker each time.
    tracker.complete(&a, 10).unwrap();
    assert_eq!(view.committable(&a), Some(12));
    let _: Vec<PartitionOffsets> = view.partitions();
}
