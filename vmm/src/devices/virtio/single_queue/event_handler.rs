//! A one-queue device on the event loop: `init` watches the activation eventfd; activation
//! registers the queue's eventfd; a kick serves the queue.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use tracing::{debug, warn};

use super::{RequestHandler, SingleQueueDevice};
use crate::devices::virtio::VirtioDevice;

const ACTIVATE_TOKEN: u32 = 0;
const QUEUE_TOKEN: u32 = 1;

impl<H: RequestHandler> MutEventSubscriber for SingleQueueDevice<H> {
    fn init(&mut self, ops: &mut EventOps) {
        let evt = Events::with_data(&self.activate_evt, ACTIVATE_TOKEN, EventSet::IN);
        if let Err(e) = ops.add(evt) {
            warn!(error = ?e, device = H::NAME, "registering the activation eventfd");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            ACTIVATE_TOKEN => {
                let _ = self.activate_evt.read();
                if !self.is_activated() || self.queue_registered {
                    return;
                }
                let [queue_evt] = &self.queue_evts;
                match ops.add(Events::with_data(queue_evt, QUEUE_TOKEN, EventSet::IN)) {
                    Ok(()) => self.queue_registered = true,
                    Err(e) => warn!(error = ?e, device = H::NAME, "registering the queue eventfd"),
                }
            }
            QUEUE_TOKEN => {
                let [queue_evt] = &self.queue_evts;
                let _ = queue_evt.read();
                self.process_queue();
            }
            other => debug!(token = other, device = H::NAME, "unexpected event"),
        }
    }
}
