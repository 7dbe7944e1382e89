//! `hello-p3`: a `wasi:http@0.3.0` `service`-world function (WASI 0.3,
//! native async). Serves `Hello from Ignis over WASI 0.3!`.

use wasip3::http::types::{ErrorCode, Fields, Request, Response};
use wasip3::{wit_bindgen, wit_future, wit_stream};

wasip3::http::service::export!(HelloP3);

struct HelloP3;

impl wasip3::exports::http::handler::Guest for HelloP3 {
    async fn handle(_request: Request) -> Result<Response, ErrorCode> {
        let (mut body_tx, body_rx) = wit_stream::new();
        let (body_result_tx, body_result_rx) = wit_future::new(|| Ok(None));
        let headers = Fields::from_list(&[("content-type".to_string(), b"text/plain".to_vec())])
            .map_err(|_| ErrorCode::InternalError(Some("headers".into())))?;
        let (response, _sent) = Response::new(headers, Some(body_rx), body_result_rx);
        drop(body_result_tx);
        wit_bindgen::spawn_local(async move {
            let remaining = body_tx.write_all(b"Hello from Ignis over WASI 0.3!\n".to_vec()).await;
            assert!(remaining.is_empty());
        });
        Ok(response)
    }
}
